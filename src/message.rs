//! The values that travel through the queue: who a message is for, how it is identified and
//! ordered, what a sender hands in and what a recipient gets out.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::clock::Timestamp;
use crate::error::Error;

/// Who a message is for: a user, a device, a channel member. Opaque bytes.
///
/// Valid ids are non-empty and at most [`RecipientId::MAX_LEN`] bytes; any bytes are allowed,
/// including `:`, `{`, NUL or invalid UTF-8. Backends must keep look-alike ids apart (the
/// conformance suite checks this). Cloning is cheap (a reference count).
///
/// The id's hash (keyed per process, so ids chosen by an attacker cannot collide on purpose) is
/// computed once, at construction, and stored with it: the engine's maps look ids up without
/// hashing their bytes again.
#[derive(Clone)]
pub struct RecipientId(Arc<[u8]>);

/// Bytes before the id's own bytes: its precomputed hash.
const HASH_PREFIX: usize = 8;

impl PartialEq for RecipientId {
    fn eq(&self, other: &Self) -> bool {
        // The hash prefix makes most unequal ids differ in the first word.
        self.0 == other.0
    }
}

impl Eq for RecipientId {}

impl std::hash::Hash for RecipientId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.precomputed_hash());
    }
}

impl PartialOrd for RecipientId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RecipientId {
    /// Byte order of the ids.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl RecipientId {
    /// The longest recipient id accepted, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates and wraps `id`.
    ///
    /// # Errors
    /// [`Error::RecipientIdEmpty`] for an empty id, [`Error::RecipientIdTooLong`] for one longer
    /// than [`RecipientId::MAX_LEN`] bytes.
    pub fn new(id: impl AsRef<[u8]>) -> Result<Self, Error> {
        let id = id.as_ref();
        if id.is_empty() {
            return Err(Error::RecipientIdEmpty);
        }
        if id.len() > Self::MAX_LEN {
            return Err(Error::RecipientIdTooLong {
                len: id.len(),
                max: Self::MAX_LEN,
            });
        }
        use std::hash::BuildHasher;
        static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let hash = KEY.get_or_init(Default::default).hash_one(id);
        let mut bytes = Vec::with_capacity(HASH_PREFIX + id.len());
        bytes.extend_from_slice(&hash.to_ne_bytes());
        bytes.extend_from_slice(id);
        Ok(Self(Arc::from(bytes)))
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0[HASH_PREFIX..]
    }

    pub(crate) fn precomputed_hash(&self) -> u64 {
        let prefix: [u8; HASH_PREFIX] = self.0[..HASH_PREFIX].try_into().expect("prefix");
        u64::from_ne_bytes(prefix)
    }
}

/// A hasher for maps keyed by [`RecipientId`]: it passes the id's precomputed hash through.
#[derive(Default)]
pub(crate) struct RecipientHasher(u64);

impl std::hash::Hasher for RecipientHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached for `RecipientId` keys; a plain FNV-1a keeps it correct for anything else.
        self.0 = crate::fnv::fnv1a_64(self.0, bytes);
    }
}

/// A map keyed by recipient, without rehashing the id.
pub(crate) type RecipientMap<V> =
    std::collections::HashMap<RecipientId, V, std::hash::BuildHasherDefault<RecipientHasher>>;

impl fmt::Debug for RecipientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecipientId({self})")
    }
}

impl fmt::Display for RecipientId {
    /// UTF-8 ids print as text; other bytes are escaped, so logs never carry raw control bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_bytes().escape_ascii())
    }
}

impl TryFrom<&str> for RecipientId {
    type Error = Error;
    fn try_from(id: &str) -> Result<Self, Error> {
        Self::new(id)
    }
}

impl TryFrom<String> for RecipientId {
    type Error = Error;
    fn try_from(id: String) -> Result<Self, Error> {
        Self::new(id)
    }
}

impl TryFrom<&[u8]> for RecipientId {
    type Error = Error;
    fn try_from(id: &[u8]) -> Result<Self, Error> {
        Self::new(id)
    }
}

/// A stable, 16-byte message identifier that travels with every delivery, so a client can drop
/// a redelivered duplicate.
///
/// [`MessageId::generate`] makes time-ordered ids (48 bits of milliseconds since the Unix epoch,
/// then 80 bits that are unique within the process and random across processes, as ULID and
/// UUIDv7 do). A sender may also choose its own id with [`MessageId::from_bytes`]: the same id
/// sent twice to the same recipient within the dedup window is stored once.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId([u8; 16]);

impl MessageId {
    /// Wraps an id chosen by the sender (a client transaction id, a hash of the content).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The id's 16 bytes.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// The id for a sender's own key (a client transaction id) within a scope (the sender),
    /// so that dedup is per (scope, key): the same key from two senders gives two ids, the
    /// same key from one sender the same id, on every host and build.
    ///
    /// The first 16 bytes of SHA-256 over `offline-queue/message-id/v1`, the scope's length
    /// as 8 big-endian bytes, the scope, then the key. The length keeps `("ab", "c")` and
    /// `("a", "bc")` apart; SHA-256 keeps a sender from choosing a key whose id collides with
    /// another sender's (which would make the other's message look like a duplicate).
    ///
    /// ```
    /// use offline_queue::MessageId;
    ///
    /// let alice = MessageId::derive(b"alice", b"m-1");
    /// assert_eq!(alice, MessageId::derive(b"alice", b"m-1"));
    /// assert_ne!(alice, MessageId::derive(b"carol", b"m-1"));
    /// ```
    pub fn derive(scope: &[u8], key: &[u8]) -> Self {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(b"offline-queue/message-id/v1");
        hash.update((scope.len() as u64).to_be_bytes());
        hash.update(scope);
        hash.update(key);
        let digest = hash.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Self(bytes)
    }

    /// A new id, ordered by creation time to the millisecond.
    pub fn generate() -> Self {
        let millis = Timestamp::now_system().as_millis();
        Self::generate_at(millis)
    }

    /// A new id stamped with `millis` since the epoch (the engine passes its clock's time).
    pub(crate) fn generate_at(millis: u64) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let salt = process_salt();
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
        // The counter keeps ids unique within the process; the salt keeps processes apart.
        bytes[6..8].copy_from_slice(&(salt as u16).to_be_bytes());
        bytes[8..].copy_from_slice(&(count ^ (salt >> 16).rotate_left(17)).to_be_bytes());
        Self(bytes)
    }

    /// Parses the 32-character lowercase or uppercase hex form printed by `Display`.
    ///
    /// # Errors
    /// [`Error::InvalidMessageId`] when `text` is not 32 hex digits.
    pub fn parse_hex(text: &str) -> Result<Self, Error> {
        let raw = text.as_bytes();
        if raw.len() != 32 {
            return Err(Error::InvalidMessageId { len: raw.len() });
        }
        let bytes = crate::hex::decode(raw).ok_or(Error::InvalidMessageId { len: raw.len() })?;
        Ok(Self(bytes.try_into().expect("32 hex digits are 16 bytes")))
    }
}

/// 64 bits that differ between processes, from the standard library's randomly seeded hasher
/// (no extra dependency for a one-time seed).
fn process_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static SALT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SALT.get_or_init(|| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(Timestamp::now_system().as_millis() as u128 ^ std::process::id() as u128);
        hasher.finish()
    })
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

/// A message's position in its recipient's queue. Strictly increasing per recipient, for as long
/// as the recipient's queue exists; not contiguous (a backend may skip numbers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How soon an offline recipient should be nudged about a stored message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Urgency {
    /// A push goes out at once, then at most once per `urgent_cooldown`.
    #[default]
    Urgent,
    /// A push goes out at most once per `background_interval`.
    Background,
    /// Stored, but never a reason to push (receipts, sync metadata).
    Silent,
}

/// A message to store for (or hand to) one recipient.
///
/// ```
/// # use offline_queue::{Envelope, RecipientId, Urgency};
/// # use std::time::Duration;
/// let envelope = Envelope::new(RecipientId::new("bob")?, b"hello".to_vec())
///     .with_ttl(Duration::from_secs(3600))
///     .with_urgency(Urgency::Background);
/// # Ok::<(), offline_queue::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Who receives it.
    pub recipient: RecipientId,
    /// The payload bytes, opaque to the queue.
    pub payload: Vec<u8>,
    /// A sender-chosen id (the dedup key); generated when `None`.
    pub id: Option<MessageId>,
    /// Time to live from now; the queue's `default_ttl` when `None`.
    pub ttl: Option<Duration>,
    /// How an offline recipient is nudged.
    pub urgency: Urgency,
}

impl Envelope {
    /// A message with raw bytes, a generated id, the default TTL and [`Urgency::Urgent`].
    pub fn new(recipient: RecipientId, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            recipient,
            payload: payload.into(),
            id: None,
            ttl: None,
            urgency: Urgency::default(),
        }
    }

    /// A message whose payload is `value` serialized with the crate's codec
    /// (read it back with [`Delivery::decode`]).
    ///
    /// # Errors
    /// [`Error::Codec`] if `value` cannot be serialized.
    pub fn encode<T: serde::Serialize>(recipient: RecipientId, value: &T) -> Result<Self, Error> {
        Ok(Self::new(recipient, crate::codec::to_bytes(value)?))
    }

    /// Sets the sender-chosen id used for dedup.
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the time to live.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets how an offline recipient is nudged.
    pub fn with_urgency(mut self, urgency: Urgency) -> Self {
        self.urgency = urgency;
        self
    }
}

/// One stored message as handed to a connected recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The message's stable id (generated or sender-chosen).
    pub id: MessageId,
    /// Its position in the recipient's queue; acks name it.
    pub seq: Seq,
    /// The payload as sent (decompressed). Shared with the stored record where the backend
    /// keeps it in memory, so handing it over copies nothing; it derefs to `&[u8]`.
    pub payload: Bytes,
    /// When the queue accepted it.
    pub sent_at: Timestamp,
    /// When it stops being deliverable, if ever.
    pub expires_at: Option<Timestamp>,
    /// Time left to live at the moment of delivery (MQTT 5 forwards this, not the deadline, so
    /// clients with skewed clocks still honour it).
    pub remaining_ttl: Option<Duration>,
    /// True when this message was handed to a transport before (in this or an earlier session)
    /// without being acked: the client may have seen it and should dedupe by `id`.
    pub redelivered: bool,
    /// How many times, this one included, the message has been handed to a transport.
    pub delivery_count: u32,
}

impl Delivery {
    /// Deserializes a payload made with [`Envelope::encode`].
    ///
    /// # Errors
    /// [`Error::Codec`] if the payload is not a valid encoding of `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        crate::codec::from_bytes(&self.payload)
    }
}

/// What one [`Transport`](crate::Transport) call hands to a connected recipient: a run of
/// messages in seq order, and how many messages were lost before them.
///
/// Once the client has processed a batch it acks it: cumulatively with
/// `handle.ack_through(batch.position)`, or message by message with `handle.ack(..)`. An ack
/// of a message of the batch (or of a later one) also confirms its gap report; a gap reported
/// in a batch without messages is confirmed by the ack of a later message. An unconfirmed gap
/// is reported again on the next connection: gaps may over-count, never under-count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Messages in seq order. Empty only when the batch exists to report a gap.
    pub messages: Vec<Delivery>,
    /// How many messages for this recipient were dropped (by `Overflow::DropOldest`), expired
    /// before the client acked them, were damaged, or were given up on after
    /// `max_deliveries`, and whose report the client has not
    /// confirmed yet. Zero when nothing was lost. May over-count, never under-count: a client
    /// is never silently short.
    pub gap: u64,
    /// The highest seq this batch covers (its last message, or the last record it passed
    /// over): what to give `ack_through` once the batch is processed.
    pub position: Seq,
}

/// A payload for a live session only (typing, presence): never stored, never a reason to push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ephemeral {
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// When the queue accepted it.
    pub sent_at: Timestamp,
}

/// What `send` tells the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendReceipt {
    /// The message's id (the sender's, or the generated one).
    pub id: MessageId,
    /// Its position in the recipient's queue (for a duplicate: the original's).
    pub seq: Seq,
    /// True if the message was already stored within the dedup window and was not stored again.
    pub duplicate: bool,
    /// True if the recipient had a live session (on this node, or on another node sharing the
    /// storage) when the message was stored.
    pub recipient_online: bool,
    /// How many older messages `Overflow::DropOldest` removed to make room.
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_follow_the_documented_hash() {
        // Computed independently: Python's hashlib over the documented bytes.
        assert_eq!(
            MessageId::derive(b"alice", b"m-1").to_string(),
            "d4e4ed3c453c26e3330f41cc960d330d"
        );
        assert_eq!(
            MessageId::derive(b"", b"").to_string(),
            "f2075ae65dce2b60bf762aecdfa53205"
        );
        // The scope's length keeps the split between scope and key.
        assert_ne!(
            MessageId::derive(b"ab", b"c"),
            MessageId::derive(b"a", b"bc")
        );
    }

    #[test]
    fn recipient_id_bounds() {
        assert!(matches!(RecipientId::new(""), Err(Error::RecipientIdEmpty)));
        assert!(RecipientId::new([0u8; 255]).is_ok());
        assert!(matches!(
            RecipientId::new([0u8; 256]),
            Err(Error::RecipientIdTooLong { len: 256, max: 255 })
        ));
        assert_eq!(
            RecipientId::new(b"a\x00\xff").unwrap().to_string(),
            "a\\x00\\xff"
        );
    }

    #[test]
    fn generated_ids_are_unique_and_time_ordered() {
        let early = MessageId::generate_at(1_000);
        let late = MessageId::generate_at(2_000);
        assert!(early < late);
        let ids: std::collections::HashSet<_> =
            (0..10_000).map(|_| MessageId::generate_at(5)).collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn message_id_hex_round_trip() {
        let id = MessageId::generate();
        assert_eq!(MessageId::parse_hex(&id.to_string()).unwrap(), id);
        assert!(matches!(
            MessageId::parse_hex("zz"),
            Err(Error::InvalidMessageId { len: 2 })
        ));
        assert!(MessageId::parse_hex(&"g".repeat(32)).is_err());
    }
}
