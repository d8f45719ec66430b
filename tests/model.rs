//! A proptest model test: random sequences of send / connect (and displace) / ack / disconnect /
//! advance clock / purge against a plain model of the contract, checked after every step.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Client, Harness, id};
use offline_queue::{Envelope, MemoryStorage, MessageId, Outbound, Seq, Storage, Timestamp};
use proptest::prelude::*;

const RECIPIENTS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Send {
        to: usize,
        ttl_secs: Option<u64>,
        dedup_key: Option<u8>,
    },
    Connect(usize),
    AckAll(usize),
    AckSome(usize, Vec<bool>),
    Disconnect(usize),
    Advance(u64),
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..RECIPIENTS, proptest::option::of(1..120u64), proptest::option::weighted(0.3, 0..4u8))
            .prop_map(|(to, ttl_secs, dedup_key)| Op::Send { to, ttl_secs, dedup_key }),
        2 => (0..RECIPIENTS).prop_map(Op::Connect),
        1 => (0..RECIPIENTS).prop_map(Op::AckAll),
        1 => (0..RECIPIENTS, proptest::collection::vec(any::<bool>(), 0..8)).prop_map(|(r, m)| Op::AckSome(r, m)),
        1 => (0..RECIPIENTS).prop_map(Op::Disconnect),
        1 => (1..90u64).prop_map(Op::Advance),
        1 => Just(Op::Purge),
    ]
}

/// What the model knows of one stored message.
#[derive(Debug)]
struct Known {
    seq: Seq,
    expires_at: Option<Timestamp>,
    delivered: u32,
    acked: bool,
    /// Acked after its deadline: the storage may already have counted it lost.
    acked_late: bool,
}

impl Known {
    fn ack(&mut self, now: Timestamp) {
        self.acked = true;
        self.acked_late = self.expires_at.is_some_and(|at| at <= now);
    }
}

#[derive(Default)]
struct Model {
    /// Per recipient: message number -> what is known.
    messages: Vec<BTreeMap<u32, Known>>,
    /// Per recipient and dedup key: (message number, when sent).
    dedup: HashMap<(usize, u8), (u32, Timestamp)>,
    next: u32,
    gaps: Vec<u64>,
}

struct Live {
    client: Client,
    last_seq: Option<Seq>,
    in_session: HashSet<u32>,
    /// Delivered in this session, unacked: (number, seq).
    unacked: Vec<(u32, Seq)>,
    /// Gaps reported and not yet confirmed by an ack: (first seq or position, gap).
    pending_gaps: Vec<(Seq, u64)>,
    /// The highest batch position seen in this session.
    position: Option<Seq>,
}

impl Live {
    fn new(client: Client) -> Self {
        Self {
            client,
            last_seq: None,
            in_session: HashSet::new(),
            unacked: Vec::new(),
            pending_gaps: Vec::new(),
            position: None,
        }
    }

    /// An ack up to `highest` confirms the gaps of batches starting at or before it.
    fn confirm_gaps(&mut self, highest: Seq, confirmed: &mut u64) {
        self.pending_gaps.retain(|&(first, gap)| {
            let done = first <= highest;
            if done {
                *confirmed += gap;
            }
            !done
        });
    }
}

fn payload(recipient: usize, number: u32) -> Vec<u8> {
    let mut p = vec![recipient as u8];
    p.extend_from_slice(&number.to_be_bytes());
    p
}

fn run(ops: Vec<Op>, storage: Arc<dyn Storage>) {
    let mut h = Harness::with(|b| {
        b.storage(storage)
            .max_in_flight(10_000)
            .max_deliveries(u32::MAX)
    });
    let mut model = Model {
        messages: (0..RECIPIENTS).map(|_| BTreeMap::new()).collect(),
        gaps: vec![0; RECIPIENTS],
        ..Model::default()
    };
    let mut live: HashMap<usize, Live> = HashMap::new();
    let window = h.queue.limits().dedup_window;

    for op in ops {
        match op {
            Op::Send {
                to,
                ttl_secs,
                dedup_key,
            } => {
                let number = model.next;
                model.next += 1;
                let mut envelope = Envelope::new(id(&format!("r{to}")), payload(to, number));
                if let Some(secs) = ttl_secs {
                    envelope = envelope.with_ttl(Duration::from_secs(secs));
                }
                if let Some(key) = dedup_key {
                    envelope = envelope.with_id(MessageId::from_bytes([
                        to as u8 + 1,
                        key,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                    ]));
                }
                let now = h.now();
                let receipt = h.try_send(envelope).unwrap();
                let original = dedup_key.and_then(|key| {
                    model
                        .dedup
                        .get(&(to, key))
                        .filter(|(_, at)| now.duration_since(*at) < window)
                        .map(|(n, _)| *n)
                });
                match original {
                    Some(first) => {
                        assert!(
                            receipt.duplicate,
                            "resend within the dedup window must be a duplicate"
                        );
                        assert_eq!(receipt.seq, model.messages[to][&first].seq);
                    }
                    None => {
                        assert!(!receipt.duplicate, "a new message reported as duplicate");
                        if let Some(key) = dedup_key {
                            model.dedup.insert((to, key), (number, now));
                        }
                        let expires_at =
                            Some(now.saturating_add(ttl_secs.map_or(
                                h.queue.limits().default_ttl.unwrap(),
                                Duration::from_secs,
                            )));
                        model.messages[to].insert(
                            number,
                            Known {
                                seq: receipt.seq,
                                expires_at,
                                delivered: 0,
                                acked: false,
                                acked_late: false,
                            },
                        );
                    }
                }
            }
            Op::Connect(who) => {
                let client = h.connect(&format!("r{who}"));
                if let Some(old) = live.insert(who, Live::new(client)) {
                    let mut old = old.client;
                    assert!(
                        matches!(
                            old.ended(&mut h),
                            Some(Ok(offline_queue::SessionEnd::Displaced))
                        ),
                        "older session displaced"
                    );
                }
            }
            Op::AckAll(who) => {
                // Through the last message, or the last batch position (a gap-only batch).
                if let Some(session) = live.get_mut(&who)
                    && let Some(seq) = session
                        .unacked
                        .iter()
                        .map(|(_, s)| *s)
                        .max()
                        .max(session.position)
                {
                    session.confirm_gaps(seq, &mut model.gaps[who]);
                    session.client.handle.ack_through(seq);
                    for (number, _) in session.unacked.drain(..) {
                        model.messages[who].get_mut(&number).unwrap().ack(h.now());
                    }
                }
            }
            Op::AckSome(who, mask) => {
                if let Some(session) = live.get_mut(&who) {
                    let mut picked = Vec::new();
                    let mut kept = Vec::new();
                    for (i, entry) in session.unacked.drain(..).enumerate() {
                        if mask.get(i).copied().unwrap_or(false) {
                            picked.push(entry)
                        } else {
                            kept.push(entry)
                        }
                    }
                    session.unacked = kept;
                    if let Some(&(_, highest)) = picked.iter().max_by_key(|(_, s)| *s) {
                        session.confirm_gaps(highest, &mut model.gaps[who]);
                    }
                    // Reordered and duplicated acks must be harmless.
                    let mut seqs: Vec<Seq> = picked.iter().map(|(_, s)| *s).rev().collect();
                    seqs.extend(seqs.clone());
                    session.client.handle.ack(seqs);
                    for (number, _) in picked {
                        model.messages[who].get_mut(&number).unwrap().ack(h.now());
                    }
                }
            }
            Op::Disconnect(who) => {
                if let Some(session) = live.remove(&who) {
                    session.client.close(&mut h);
                }
            }
            Op::Advance(secs) => h.advance(Duration::from_secs(secs)),
            Op::Purge => {
                h.maintain();
            }
        }
        check(&mut h, &mut model, &mut live);
    }

    // The end: close every session, let everything expire, connect everyone once more: every
    // message is accounted for as acked or reported lost.
    for (_, session) in live.drain() {
        session.client.close(&mut h);
    }
    h.advance(Duration::from_secs(400 * 24 * 3600));
    for who in 0..RECIPIENTS {
        live.insert(who, Live::new(h.connect(&format!("r{who}"))));
    }
    check(&mut h, &mut model, &mut live);
    for who in 0..RECIPIENTS {
        let reported_now: u64 = live[&who].pending_gaps.iter().map(|(_, g)| g).sum();
        // Every message never acked expired by now and must have been reported; one acked
        // after its deadline may have been counted too (a gap may over-count, never under).
        let never_acked = model.messages[who].values().filter(|k| !k.acked).count() as u64;
        let acked_late = model.messages[who]
            .values()
            .filter(|k| k.acked_late)
            .count() as u64;
        let reported = model.gaps[who] + reported_now;
        assert!(
            (never_acked..=never_acked + acked_late).contains(&reported),
            "r{who}: {reported} reported in gaps; {never_acked} expired unacked, {acked_late} acked late"
        );
    }
}

/// Drains every live session and checks what arrived against the model.
fn check(h: &mut Harness, model: &mut Model, live: &mut HashMap<usize, Live>) {
    let now = h.now();
    for (&who, session) in live.iter_mut() {
        for item in session.client.drain(h) {
            let Outbound::Batch(batch) = item else {
                continue;
            };
            session.position = session.position.max(Some(batch.position));
            if batch.gap > 0 {
                // Confirmed once a message of this batch or a later one is acked (for a batch
                // without messages: a later one).
                let first = batch
                    .messages
                    .first()
                    .map_or(Seq(batch.position.0 + 1), |m| m.seq);
                session.pending_gaps.push((first, batch.gap));
            }
            for message in batch.messages {
                assert_eq!(
                    message.payload[0] as usize, who,
                    "a message of another recipient was delivered"
                );
                let number = u32::from_be_bytes(message.payload[1..5].try_into().unwrap());
                let known = model.messages[who]
                    .get_mut(&number)
                    .expect("delivered a message never sent");
                assert!(!known.acked, "an acked message was delivered again");
                assert_eq!(message.seq, known.seq);
                assert!(
                    known.expires_at.is_none_or(|at| at > now),
                    "an expired message was delivered"
                );
                assert!(
                    session.last_seq < Some(message.seq),
                    "out of order within a session"
                );
                assert_eq!(
                    message.redelivered,
                    known.delivered > 0,
                    "redelivery marking"
                );
                known.delivered += 1;
                session.last_seq = Some(message.seq);
                session.in_session.insert(number);
                session.unacked.push((number, message.seq));
            }
        }
        // No loss: every live message of this recipient reached this session.
        for (number, known) in &model.messages[who] {
            let deliverable = !known.acked && known.expires_at.is_none_or(|at| at > now);
            assert!(
                !deliverable || session.in_session.contains(number),
                "message {number} of r{who} is stored and unacked but was not delivered"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn engine_keeps_the_contract_on_memory(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, Arc::new(MemoryStorage::new()));
    }
}

#[cfg(feature = "redb")]
proptest! {
    // Every write is an fsynced commit: fewer cases, same contract.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn engine_keeps_the_contract_on_redb(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let storage = offline_queue::RedbStorage::open(dir.path().join("model.redb")).unwrap();
        run(ops, Arc::new(common::Settled(storage)));
    }
}

#[cfg(feature = "redis")]
mod redis_support;

/// The Redis model runs share one tokio runtime, which drives the connections; the harness
/// polls the engine on its own pool, inside the runtime's context.
#[cfg(feature = "redis")]
fn on_redis(ops: Vec<Op>, target: Option<redis_support::Target>) {
    let Some(target) = target else {
        return;
    };
    let (_context, storage) = redis_support::fresh_blocking(&target, "model");
    run(ops, Arc::new(common::Settled(storage)));
}

#[cfg(feature = "redis")]
proptest! {
    // Each step is a round trip to Redis: fewer cases, same contract.
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn engine_keeps_the_contract_on_redis(ops in proptest::collection::vec(op(), 1..60)) {
        on_redis(ops, redis_support::Target::single());
    }

    #[test]
    fn engine_keeps_the_contract_on_a_redis_cluster(ops in proptest::collection::vec(op(), 1..60)) {
        on_redis(ops, redis_support::Target::cluster());
    }
}
