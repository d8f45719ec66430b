//! One recipient's queue state, kept as the single message of its subject in the meta stream
//! and changed only by compare-and-set (a publish expecting the subject's last sequence). Every
//! decision the contract asks to be atomic (positions, quotas, overflow, acks, delivery counts,
//! losses) is a pure change to this value, made here and written back in one publish.

use std::collections::VecDeque;

use crate::error::{Error, Result, Retry};
use crate::limits::{Admission, Quota};
use crate::message::Seq;

/// The layout's version, the first byte of every meta value.
const VERSION: u8 = 1;
/// Above any position, count or total a real queue reaches; a meta claiming more is damaged
/// (and arithmetic on it could overflow).
const LIMIT: u64 = 1 << 62;

// Layout 1: version, floor, lost total, lost confirmed, reservations (first, count, ms), then
// per slot: size << 1 | removed, deliveries. Numbers are LEB128.

/// One position above the floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Slot {
    /// The record's body length.
    pub size: u32,
    /// Times marked delivered.
    pub deliveries: u32,
    /// Acked, dropped, passed over, or a reservation whose publish never landed: no record
    /// to read here.
    pub removed: bool,
}

/// Positions reserved by an append whose records may not be published yet, and when (wall
/// clock, ms). A reader that meets a missing record inside a fresh reservation waits for it;
/// outside one, the appender is gone, and the reader closes the position with a tombstone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Reservation {
    pub first: u64,
    pub count: u64,
    pub at_ms: u64,
}

/// A recipient's queue: positions up to `floor` are gone; `slots[i]` is position
/// `floor + 1 + i`; the next append takes `next()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Meta {
    pub floor: u64,
    slots: VecDeque<Slot>,
    /// Slots holding a record, and their bytes: kept as slots change, so a quota check
    /// costs the same on a deep queue as on an empty one.
    live: (u64, u64),
    /// Grows by one per record lost; never goes back, even across the queue being removed
    /// and made again (a new queue starts it at its base, above any earlier total).
    pub lost_total: u64,
    pub lost_confirmed: u64,
    pub reservations: Vec<Reservation>,
}

/// What [`Meta::reserve`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Reserved {
    /// The first new record's position; the rest follow in order.
    pub first: u64,
    /// Positions dropped to make room (`Overflow::DropOldest`), to remove from the stream.
    pub dropped: Vec<u64>,
}

/// What [`Meta::ack`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Acked {
    /// Records removed by `through` and `seqs`.
    pub acked: u64,
    /// Every position removed, passed-over ones included, to remove from the stream.
    pub positions: Vec<u64>,
}

impl Meta {
    /// A new queue above `base`, a number at least as high as any position or loss total
    /// this recipient's earlier queue could have used.
    pub fn new(base: u64) -> Self {
        Self {
            floor: base,
            slots: VecDeque::new(),
            live: (0, 0),
            lost_total: base,
            lost_confirmed: base,
            reservations: Vec::new(),
        }
    }

    /// The position the next append takes.
    pub fn next(&self) -> u64 {
        self.floor + 1 + self.slots.len() as u64
    }

    /// True if `position` holds a record (or its pending reservation).
    pub fn holds(&self, position: u64) -> bool {
        self.slot(position).is_some_and(|slot| !slot.removed)
    }

    pub fn slot(&self, position: u64) -> Option<&Slot> {
        let index = position.checked_sub(self.floor + 1)?;
        self.slots.get(usize::try_from(index).ok()?)
    }

    fn slot_mut(&mut self, position: u64) -> Option<&mut Slot> {
        let index = position.checked_sub(self.floor + 1)?;
        self.slots.get_mut(usize::try_from(index).ok()?)
    }

    /// Records stored, and their bytes.
    pub fn live(&self) -> (u64, u64) {
        debug_assert_eq!(self.live, count_live(&self.slots));
        self.live
    }

    /// Positions from the floor up to the last appended, removed ones included.
    pub fn span(&self) -> usize {
        self.slots.len()
    }

    /// The same recipient's queue once removed: nothing in it, its next position and its
    /// losses (all confirmed) kept, so nothing of it is taken for the next one's.
    pub fn emptied(&self) -> Self {
        Self {
            floor: self.next() - 1,
            slots: VecDeque::new(),
            live: (0, 0),
            lost_total: self.lost_total,
            lost_confirmed: self.lost_total,
            reservations: Vec::new(),
        }
    }

    /// Marks the slot at `position` removed, keeping the totals; false if it held nothing.
    fn remove(&mut self, position: u64) -> bool {
        let Some(slot) = self.slot_mut(position) else {
            return false;
        };
        if slot.removed {
            return false;
        }
        slot.removed = true;
        let size = u64::from(slot.size);
        self.live = (self.live.0 - 1, self.live.1 - size);
        true
    }

    /// The highest position holding a record.
    pub fn newest(&self) -> Option<u64> {
        let last = self.slots.iter().rposition(|slot| !slot.removed)?;
        Some(self.floor + 1 + last as u64)
    }

    /// Positions at or after `start` that hold records, in order.
    pub fn live_from(&self, start: u64) -> impl Iterator<Item = (u64, Slot)> + '_ {
        let skip = start.saturating_sub(self.floor + 1);
        let floor = self.floor;
        self.slots
            .iter()
            .enumerate()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .filter(|(_, slot)| !slot.removed)
            .map(move |(i, slot)| (floor + 1 + i as u64, *slot))
    }

    /// Reserves positions for records of `sizes` under `quota`, dropping the oldest first if
    /// the policy says so; `now_ms` (wall clock) dates the reservation.
    ///
    /// # Errors
    /// [`Error::QueueFull`] when they do not fit, with nothing changed.
    /// A reservation within `merge_ms` of the last one extends it rather than adding one, so
    /// a burst of appends to one recipient keeps the list short.
    pub fn reserve(
        &mut self,
        sizes: &[u32],
        quota: &Quota,
        now_ms: u64,
        merge_ms: u64,
    ) -> Result<Reserved> {
        let adding = sizes.len() as u64;
        let adding_bytes: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
        let (mut messages, mut bytes) = self.live();
        let mut dropped = Vec::new();
        if quota.admit(messages, bytes, adding, adding_bytes)? == Admission::DropOldestFirst {
            let floor = self.floor;
            for (i, slot) in self.slots.iter_mut().enumerate() {
                if quota.fits(messages, bytes, adding, adding_bytes) {
                    break;
                }
                if slot.removed {
                    continue;
                }
                slot.removed = true;
                messages -= 1;
                bytes -= u64::from(slot.size);
                dropped.push(floor + 1 + i as u64);
            }
            self.lost_total += dropped.len() as u64;
        }
        let first = self.next();
        self.slots.extend(sizes.iter().map(|&size| Slot {
            size,
            deliveries: 0,
            removed: false,
        }));
        self.live = (messages + adding, bytes + adding_bytes);
        match self.reservations.last_mut() {
            _ if adding == 0 => {}
            // Dated by its first reservation: a merged position goes stale at most
            // `merge_ms` early, never late.
            Some(last)
                if last.first + last.count == first
                    && now_ms.saturating_sub(last.at_ms) < merge_ms =>
            {
                last.count += adding;
            }
            _ => self.reservations.push(Reservation {
                first,
                count: adding,
                at_ms: now_ms,
            }),
        }
        self.compact();
        Ok(Reserved { first, dropped })
    }

    /// Takes in a position found beyond [`Meta::next`] (a single owner's append the state
    /// did not record yet): positions skipped on the way hold nothing; `position` holds a
    /// record of `size`, or nothing (`None`). A position below `next()` is left as it is.
    pub fn adopt(&mut self, position: u64, size: Option<u32>) {
        let empty = Slot {
            size: 0,
            deliveries: 0,
            removed: true,
        };
        while self.next() < position {
            self.slots.push_back(empty);
        }
        if self.next() == position {
            self.slots.push_back(match size {
                Some(size) => {
                    self.live = (self.live.0 + 1, self.live.1 + u64::from(size));
                    Slot {
                        size,
                        deliveries: 0,
                        removed: false,
                    }
                }
                None => empty,
            });
        }
        self.compact();
    }

    /// Forgets reservations made before `stale_before_ms` (wall clock), and those wholly at
    /// or below the floor: a position they held is either published by now or never will be.
    pub fn forget_reservations(&mut self, stale_before_ms: u64) {
        let floor = self.floor;
        self.reservations
            .retain(|r| r.at_ms >= stale_before_ms && r.first + r.count > floor + 1);
    }

    /// When the reservation holding `position` was made (wall clock, ms), if one still
    /// does: until it is stale its appender may still publish the record.
    pub fn reserved_at(&self, position: u64) -> Option<u64> {
        self.reservations
            .iter()
            .filter(|r| position >= r.first && position < r.first + r.count)
            .map(|r| r.at_ms)
            .max()
    }

    /// A position that will never hold a record (a tombstone holds its place), closed.
    /// `lost`: counted as a loss, for a position a reader closed, which may have held a
    /// record the server since removed (an append that failed is then over-counted, as the
    /// contract allows); not for a record that gave way to its duplicate. False if it held
    /// nothing any more.
    pub fn abandon(&mut self, position: u64, lost: bool) -> bool {
        let was = self.remove(position);
        if was && lost {
            self.lost_total += 1;
        }
        self.compact();
        was
    }

    /// Counts one more hand-over for each listed position that holds a record.
    pub fn mark_delivered(&mut self, seqs: &[Seq]) {
        for seq in seqs {
            if let Some(slot) = self.slot_mut(seq.0)
                && !slot.removed
            {
                slot.deliveries = slot.deliveries.saturating_add(1);
            }
        }
    }

    /// Applies an ack: cumulative through `through`, selective `seqs`, passed-over ones
    /// counted as lost, then the confirmed-loss mark.
    pub fn ack(&mut self, ack: &crate::storage::Ack) -> Acked {
        let mut out = Acked::default();
        if let Some(through) = ack.through {
            let last = through.0.min(self.next() - 1);
            for position in self.floor + 1..=last {
                if self.remove(position) {
                    out.acked += 1;
                    out.positions.push(position);
                }
            }
        }
        for (seqs, lost) in [(&ack.seqs, false), (&ack.passed_over, true)] {
            for seq in seqs {
                if self.remove(seq.0) {
                    out.positions.push(seq.0);
                    if lost {
                        self.lost_total += 1;
                    } else {
                        out.acked += 1;
                    }
                }
            }
        }
        if let Some(through) = ack.lost_confirmed_through {
            self.lost_confirmed = self.lost_confirmed.max(through.min(self.lost_total));
        }
        self.compact();
        out
    }

    /// Moves the floor over removed positions at the front.
    fn compact(&mut self) {
        while self.slots.front().is_some_and(|slot| slot.removed) {
            self.slots.pop_front();
            self.floor += 1;
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 3 * self.slots.len());
        out.push(VERSION);
        for value in [self.floor, self.lost_total, self.lost_confirmed] {
            put(&mut out, value);
        }
        put(&mut out, self.reservations.len() as u64);
        for r in &self.reservations {
            for value in [r.first, r.count, r.at_ms] {
                put(&mut out, value);
            }
        }
        put(&mut out, self.slots.len() as u64);
        for slot in &self.slots {
            put(
                &mut out,
                u64::from(slot.size) << 1 | u64::from(slot.removed),
            );
            put(&mut out, u64::from(slot.deliveries));
        }
        out
    }

    /// # Errors
    /// A storage error (not retryable) naming the fault, for a value this build cannot read.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut input = Input(bytes);
        match input.byte()? {
            VERSION => {}
            other => {
                return Err(Error::storage_msg(
                    Retry::No,
                    format!(
                        "nats: a queue's meta is in layout {other}, which this build (layout \
                         {VERSION}) does not read; left untouched"
                    ),
                ));
            }
        }
        let (floor, lost_total, lost_confirmed) = (input.int()?, input.int()?, input.int()?);
        if floor > LIMIT || lost_total > LIMIT {
            return Err(damaged("its counters"));
        }
        let count = input.len()?;
        let mut reservations = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let reservation = Reservation {
                first: input.int()?,
                count: input.int()?,
                at_ms: input.int()?,
            };
            if reservation.first > LIMIT || reservation.count > LIMIT || reservation.at_ms > LIMIT {
                return Err(damaged("a reservation"));
            }
            reservations.push(reservation);
        }
        let count = input.len()?;
        let mut slots = VecDeque::with_capacity(count.min(1 << 16));
        for _ in 0..count {
            let packed = input.int()?;
            let size = u32::try_from(packed >> 1).map_err(|_| damaged("a size"))?;
            let deliveries = u32::try_from(input.int()?).map_err(|_| damaged("a count"))?;
            slots.push_back(Slot {
                size,
                removed: packed & 1 == 1,
                deliveries,
            });
        }
        if !input.0.is_empty() || lost_confirmed > lost_total {
            return Err(damaged("its end"));
        }
        Ok(Self {
            floor,
            live: count_live(&slots),
            slots,
            lost_total,
            lost_confirmed,
            reservations,
        })
    }
}

/// Slots holding a record, and their bytes, counted.
fn count_live(slots: &VecDeque<Slot>) -> (u64, u64) {
    slots
        .iter()
        .filter(|slot| !slot.removed)
        .fold((0, 0), |(n, bytes), slot| {
            (n + 1, bytes + u64::from(slot.size))
        })
}

fn damaged(what: &str) -> Error {
    Error::storage_msg(
        Retry::No,
        format!("nats: a queue's meta is damaged at {what}; left untouched"),
    )
}

/// LEB128: seven bits a byte, low first.
fn put(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Result<u8> {
        let (&first, rest) = self.0.split_first().ok_or_else(|| damaged("its end"))?;
        self.0 = rest;
        Ok(first)
    }

    fn int(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(damaged("a number"))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.int()?;
        // Each entry takes at least one byte: a larger count is damage, not a big queue.
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.0.len())
            .ok_or_else(|| damaged("a count"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Overflow;
    use crate::storage::Ack;

    fn quota(max_messages: u64, overflow: Overflow) -> Quota {
        Quota {
            max_messages,
            max_bytes: 100,
            overflow,
            ..Quota::UNLIMITED
        }
    }

    #[test]
    fn positions_follow_the_base_and_acks_move_the_floor() {
        let mut meta = Meta::new(41);
        let reserved = meta
            .reserve(&[1, 2, 3], &Quota::UNLIMITED, 5, 1_000)
            .unwrap();
        assert_eq!(reserved.first, 42);
        assert_eq!((meta.next(), meta.live()), (45, (3, 6)));
        let acked = meta.ack(&Ack {
            through: Some(Seq(42)),
            seqs: vec![Seq(44), Seq(99)],
            ..Ack::default()
        });
        assert_eq!(acked.acked, 2);
        assert_eq!(acked.positions, [42, 44]);
        assert_eq!(
            (meta.floor, meta.live(), meta.newest()),
            (42, (1, 2), Some(43))
        );
        meta.ack(&Ack {
            through: Some(Seq(1_000)),
            ..Ack::default()
        });
        assert_eq!((meta.floor, meta.next(), meta.newest()), (44, 45, None));
        assert_eq!(
            meta.reserve(&[1], &Quota::UNLIMITED, 6, 1_000)
                .unwrap()
                .first,
            45
        );
    }

    #[test]
    fn quotas_reject_whole_or_drop_the_oldest_as_lost() {
        let mut meta = Meta::new(0);
        meta.reserve(&[10, 10], &quota(3, Overflow::Reject), 0, 1_000)
            .unwrap();
        let before = meta.clone();
        let full = meta.reserve(&[10, 10], &quota(3, Overflow::Reject), 0, 1_000);
        assert!(matches!(full, Err(Error::QueueFull { messages: 2, .. })));
        let bytes = meta.reserve(&[90], &quota(3, Overflow::Reject), 0, 1_000);
        assert!(matches!(bytes, Err(Error::QueueFull { bytes: 20, .. })));
        assert_eq!(meta, before, "nothing changed");

        let reserved = meta
            .reserve(&[1, 1], &quota(3, Overflow::DropOldest), 0, 1_000)
            .unwrap();
        assert_eq!(reserved.dropped, [1]);
        assert_eq!((meta.live(), meta.lost_total, meta.floor), ((3, 12), 1, 1));
        let too_big = meta.reserve(&[1; 4], &quota(3, Overflow::DropOldest), 0, 1_000);
        assert!(matches!(too_big, Err(Error::QueueFull { .. })));
    }

    #[test]
    fn losses_are_confirmed_up_to_the_total_and_deliveries_counted() {
        let mut meta = Meta::new(7);
        meta.reserve(&[1, 1, 1], &Quota::UNLIMITED, 0, 1_000)
            .unwrap();
        meta.mark_delivered(&[Seq(8), Seq(8), Seq(10), Seq(11)]);
        assert_eq!(meta.slot(8).unwrap().deliveries, 2);
        assert_eq!(meta.slot(9).unwrap().deliveries, 0);
        let acked = meta.ack(&Ack {
            passed_over: vec![Seq(9), Seq(9)],
            lost_confirmed_through: Some(100),
            ..Ack::default()
        });
        assert_eq!(
            (acked.acked, meta.lost_total, meta.lost_confirmed),
            (0, 8, 8)
        );
    }

    #[test]
    fn reservations_go_stale_and_abandoned_positions_close_without_a_loss() {
        let mut meta = Meta::new(0);
        meta.reserve(&[1, 1], &Quota::UNLIMITED, 1_000, 1_000)
            .unwrap();
        assert_eq!(meta.reserved_at(2), Some(1_000));
        assert_eq!(meta.reserved_at(3), None, "not reserved");
        meta.reserve(&[1], &Quota::UNLIMITED, 1_500, 1_000).unwrap();
        meta.reserve(&[1], &Quota::UNLIMITED, 2_500, 1_000).unwrap();
        assert_eq!(
            meta.reservations.len(),
            2,
            "within a second: one reservation"
        );
        assert_eq!(meta.reserved_at(3), Some(1_000), "dated by its first");
        assert_eq!(meta.reserved_at(4), Some(2_500));
        assert!(meta.abandon(1, false));
        assert!(!meta.abandon(1, true));
        assert_eq!((meta.floor, meta.lost_total, meta.live()), (1, 0, (3, 3)));
        assert!(meta.abandon(3, true), "closed by a reader: lost");
        assert_eq!((meta.lost_total, meta.live()), (1, (2, 2)));
        meta.forget_reservations(2_501);
        assert!(meta.reservations.is_empty());
    }

    #[test]
    fn encoding_round_trips_and_damage_is_refused() {
        let mut meta = Meta::new(u64::MAX / 4);
        meta.reserve(&[0, 70_000, u32::MAX], &Quota::UNLIMITED, 123, 1_000)
            .unwrap();
        meta.mark_delivered(&[Seq(u64::MAX / 4 + 2)]);
        meta.ack(&Ack {
            seqs: vec![Seq(u64::MAX / 4 + 3)],
            ..Ack::default()
        });
        let bytes = meta.encode();
        assert_eq!(Meta::decode(&bytes).unwrap(), meta);
        for cut in 0..bytes.len() {
            assert!(Meta::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut newer = bytes.clone();
        newer[0] = 2;
        let error = Meta::decode(&newer).unwrap_err().to_string();
        assert!(error.contains("layout 2"), "{error}");
        let mut longer = bytes;
        longer.push(0);
        assert!(Meta::decode(&longer).is_err());
        // Counters no queue reaches are damage, not arithmetic to overflow on.
        let mut huge = vec![VERSION];
        put(&mut huge, u64::MAX);
        put(&mut huge, 0);
        put(&mut huge, 0);
        put(&mut huge, 0);
        put(&mut huge, 0);
        assert!(Meta::decode(&huge).is_err());
    }
}
