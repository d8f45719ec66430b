//! Time, injectable: the engine asks a [`Clock`] for "now" and passes it down to storage, so tests
//! move time by hand instead of sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (wall-clock time, as stored with each message).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch itself.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp `millis` milliseconds after the epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// The system's wall clock now (the epoch if the clock reads earlier than it).
    pub fn now_system() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// `self + duration`, rounded up to the next millisecond (so a positive TTL never yields a
    /// deadline that has already passed), or `None` past the end of representable time.
    pub fn checked_add(self, duration: Duration) -> Option<Self> {
        let partial = u64::from(!duration.subsec_nanos().is_multiple_of(1_000_000));
        let millis = u64::try_from(duration.as_millis())
            .ok()?
            .checked_add(partial)?;
        self.0.checked_add(millis).map(Self)
    }

    /// `self + duration`, clamped to the end of representable time.
    pub fn saturating_add(self, duration: Duration) -> Self {
        self.checked_add(duration).unwrap_or(Self(u64::MAX))
    }

    /// `self - duration`, clamped at the epoch.
    pub fn saturating_sub(self, duration: Duration) -> Self {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Self(self.0.saturating_sub(millis))
    }

    /// Time from `earlier` to `self`; zero if `earlier` is later.
    pub fn duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// A source of wall-clock time.
///
/// Expiry compares each message's deadline with `now()` at every read, so a clock that steps
/// backwards delays expiry by the size of the step; it never makes an expired message
/// deliverable after it was purged, nor loses one.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system wall clock, read cheaply.
///
/// On Linux it reads the kernel's coarse real-time clock (`CLOCK_REALTIME_COARSE`), which
/// moves once per scheduler tick (1 to 10 ms, by the kernel's tick rate) and costs a memory
/// read, several times cheaper than [`SystemTime::now`] (the engine reads the clock once per
/// send and per batch; BENCHMARKS.md has the figures). So a stamp may lag the precise time by up to one tick, and a
/// message may expire up to one tick early or late. Elsewhere it reads [`SystemTime::now`].
/// A host that needs sub-tick precision passes its own [`Clock`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        coarse_now()
    }
}

#[cfg(target_os = "linux")]
fn coarse_now() -> Timestamp {
    use rustix::time::{ClockId, clock_gettime};
    let now = clock_gettime(ClockId::RealtimeCoarse);
    // Before the epoch (a badly set clock) reads as the epoch, as `now_system` does.
    let (Ok(secs), Ok(nanos)) = (u64::try_from(now.tv_sec), u64::try_from(now.tv_nsec)) else {
        return Timestamp::ZERO;
    };
    Timestamp(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000))
}

#[cfg(not(target_os = "linux"))]
fn coarse_now() -> Timestamp {
    Timestamp::now_system()
}

/// A clock moved by hand, for tests and simulations. Clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock that reads `start`.
    pub fn new(start: Timestamp) -> Self {
        Self(Arc::new(AtomicU64::new(start.as_millis())))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let millis = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(millis))
            });
    }

    /// Sets the clock to `to`, forwards or backwards.
    pub fn set(&self, to: Timestamp) {
        self.0.store(to.as_millis(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_reads_the_wall_clock() {
        let before = Timestamp::now_system();
        let read = SystemClock.now();
        let after = Timestamp::now_system();
        // A coarse clock lags by about a tick (10 ms at the slowest common HZ of 100); the
        // bound is loose because a loaded machine may run a tick late. What is checked is
        // that it reads the wall clock, not the tick.
        assert!(read <= after, "{read} is ahead of {after}");
        assert!(
            before.duration_since(read) <= Duration::from_millis(100),
            "{read} lags {before} by more than 100 ms"
        );
    }
}
