//! A simulated disk for redb (a `StorageBackend`) that keeps what was synced apart from what
//! was only written, so a test can cut the power: what survives is the synced bytes plus any
//! subset of the pages written since, as a real disk may have flushed some on its own. Shared
//! by `redb_power_cut.rs` and the simulation's redb seeds.

// Each test file that includes this module uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::Arc;

use parking_lot::Mutex;

/// What survives a cut, or is lost, together.
pub const PAGE: usize = 4096;

/// What the simulated disk holds.
#[derive(Debug, Default)]
struct DiskState {
    /// What survives a power cut for certain: the bytes as of the last sync.
    synced: Vec<u8>,
    /// What reads see: the synced bytes with every later write applied.
    current: Vec<u8>,
    /// Pages written (or cut off by a shorter length) since the last sync.
    unsynced: BTreeSet<usize>,
    /// The power goes at this write (counting from when the disk is armed); `None`: not armed.
    writes_until_cut: Option<u64>,
    off: bool,
}

/// The simulated disk; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Disk(Arc<Mutex<DiskState>>);

fn power_off() -> std::io::Error {
    std::io::Error::other("power cut")
}

impl Disk {
    /// A disk holding `image`, all of it synced (a file as a restart finds it).
    pub fn from_image(image: Vec<u8>) -> Self {
        Disk(Arc::new(Mutex::new(DiskState {
            synced: image.clone(),
            current: image,
            ..DiskState::default()
        })))
    }

    /// True once the power went (an armed write came, or `cut` was called).
    pub fn is_off(&self) -> bool {
        self.0.lock().off
    }

    /// True once armed, whether or not the armed write came yet.
    pub fn is_armed(&self) -> bool {
        self.0.lock().writes_until_cut.is_some()
    }

    /// The power goes at the `n`th write from now (the first is 1).
    pub fn arm(&self, n: u64) {
        self.0.lock().writes_until_cut = Some(n);
    }

    /// Cuts the power (if the armed write never came) and returns what the disk holds: the
    /// synced bytes, with each page written since the last sync kept or lost by `keep`.
    pub fn cut(&self, mut keep: impl FnMut() -> bool) -> (Vec<u8>, usize, usize) {
        let mut state = self.0.lock();
        state.off = true;
        let mut image = state.synced.clone();
        let (mut kept, mut lost) = (0, 0);
        for &page in &state.unsynced {
            let start = page * PAGE;
            if start >= state.current.len() {
                continue;
            }
            if !keep() {
                lost += 1;
                continue;
            }
            kept += 1;
            let end = (start + PAGE).min(state.current.len());
            if image.len() < end {
                image.resize(end, 0);
            }
            image[start..end].copy_from_slice(&state.current[start..end]);
        }
        (image, kept, lost)
    }
}

impl redb::StorageBackend for Disk {
    fn len(&self) -> std::io::Result<u64> {
        let state = self.0.lock();
        if state.off {
            return Err(power_off());
        }
        Ok(state.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let state = self.0.lock();
        if state.off {
            return Err(power_off());
        }
        let start = offset as usize;
        let bytes = state
            .current
            .get(start..start + out.len())
            .ok_or_else(|| std::io::Error::other("read past the end"))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut state = self.0.lock();
        if state.off {
            return Err(power_off());
        }
        let (old, new) = (state.current.len(), len as usize);
        state.current.resize(new, 0);
        // The pages between the two lengths changed; until a sync, either length may survive.
        let (low, high) = (old.min(new), old.max(new));
        for page in low / PAGE..high.div_ceil(PAGE) {
            state.unsynced.insert(page);
        }
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        let mut state = self.0.lock();
        if state.off {
            return Err(power_off());
        }
        let state = &mut *state;
        state.synced.resize(state.current.len(), 0);
        for page in std::mem::take(&mut state.unsynced) {
            let start = page * PAGE;
            let end = (start + PAGE).min(state.current.len());
            if start < end {
                state.synced[start..end].copy_from_slice(&state.current[start..end]);
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut state = self.0.lock();
        if state.off {
            return Err(power_off());
        }
        if let Some(left) = &mut state.writes_until_cut {
            *left -= 1;
            if *left == 0 {
                // The write that was under way when the power went: it may or may not have
                // reached the disk; its pages count as written and unsynced.
                state.off = true;
            }
        }
        let start = offset as usize;
        let end = start + data.len();
        if state.current.len() < end {
            state.current.resize(end, 0);
        }
        state.current[start..end].copy_from_slice(data);
        for page in start / PAGE..end.div_ceil(PAGE) {
            state.unsynced.insert(page);
        }
        if state.off {
            return Err(power_off());
        }
        Ok(())
    }
}
