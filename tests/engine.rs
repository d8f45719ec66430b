//! The engine's behaviour over the memory backend: delivery, batching, acks, redelivery,
//! displacement, dead letters, expiry and gaps, ephemeral messages, nudges and maintenance.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Harness, id, payloads};
use offline_queue::{
    BatchLimit, Envelope, Error, Limits, MessageId, Notifier, NotifyError, NotifyPolicy, Nudge,
    NudgeReason, Outbound, Overflow, Seq, SessionEnd, Urgency,
};

#[test]
fn offline_messages_arrive_in_order_in_one_batch_then_caught_up() {
    let mut h = Harness::new();
    for i in 0..5u8 {
        let receipt = h.send("bob", &[i]);
        assert!(!receipt.recipient_online);
    }
    let mut bob = h.connect("bob");
    let items = bob.drain(&mut h);
    assert_eq!(items.len(), 2, "one batch, then caught-up: {items:?}");
    let Outbound::Batch(batch) = &items[0] else {
        panic!("batch first")
    };
    assert_eq!(
        payloads(std::slice::from_ref(batch)),
        (0..5u8).map(|i| vec![i]).collect::<Vec<_>>()
    );
    assert_eq!(batch.gap, 0);
    assert!(batch.messages.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(items[1], Outbound::CaughtUp);
}

#[test]
fn caught_up_comes_at_once_when_nothing_waits_and_only_once() {
    let mut h = Harness::new();
    let mut bob = h.connect("bob");
    assert_eq!(bob.drain(&mut h), [Outbound::CaughtUp]);
    h.send("bob", b"live");
    let items = bob.drain(&mut h);
    assert_eq!(
        items.len(),
        1,
        "a live message, no second caught-up: {items:?}"
    );
    assert!(matches!(&items[0], Outbound::Batch(b) if b.messages[0].payload == b"live"[..]));
}

/// A storage whose stats cannot name the newest seq (`exact_stats` false, as RabbitMQ's for a
/// recipient the node holds nothing of): `caught_up` comes after the whole backlog, not after
/// the first window of it.
#[test]
fn caught_up_waits_for_the_whole_backlog_when_stats_cannot_name_its_end() {
    let storage = Arc::new(common::Shaped::new().with_inexact_stats());
    let mut h = Harness::with(|b| b.storage(storage.clone()).max_in_flight(4));
    for i in 0..10u8 {
        h.send("bob", &[i]);
    }
    let mut bob = h.connect("bob");
    let mut got = Vec::new();
    loop {
        let items = bob.drain(&mut h);
        assert!(!items.is_empty(), "stalled after {got:?}, no caught_up");
        let caught_up = items.contains(&Outbound::CaughtUp);
        for item in items {
            if let Outbound::Batch(batch) = item {
                got.extend(batch.messages.iter().map(|m| m.payload[0]));
                if let Some(last) = batch.messages.last() {
                    bob.handle.ack_through(last.seq);
                }
            } else {
                assert_eq!(item, Outbound::CaughtUp);
                assert_eq!(
                    got,
                    (0..10u8).collect::<Vec<_>>(),
                    "all of it before caught_up"
                );
            }
        }
        if caught_up {
            break;
        }
    }
}

#[test]
fn batches_are_bounded_by_count_and_bytes() {
    let mut h = Harness::with(|b| {
        b.batch(BatchLimit {
            max_messages: 4,
            max_bytes: 33,
        })
    });
    for _ in 0..10 {
        h.send("bob", &[0; 10]);
    }
    let mut bob = h.connect("bob");
    let sizes: Vec<usize> = bob
        .batches(&mut h)
        .iter()
        .map(|b| b.messages.len())
        .collect();
    assert_eq!(
        sizes,
        [3, 3, 3, 1],
        "10-byte payloads are 11 bytes stored; 33-byte batches hold 3"
    );
}

#[test]
fn in_flight_window_holds_back_until_acked() {
    let mut h = Harness::with(|b| {
        b.max_in_flight(3).batch(BatchLimit {
            max_messages: 2,
            max_bytes: 1 << 20,
        })
    });
    for i in 0..7u8 {
        h.send("bob", &[i]);
    }
    let mut bob = h.connect("bob");
    let first = bob.batches(&mut h);
    assert_eq!(payloads(&first), [[0u8], [1], [2]], "window of three");
    bob.handle.ack([first[0].messages[0].seq]);
    assert_eq!(
        payloads(&bob.batches(&mut h)),
        [[3u8]],
        "one acked, one more goes out"
    );
    bob.handle.ack_through(Seq(u64::MAX));
    assert_eq!(payloads(&bob.batches(&mut h)), [[4u8], [5], [6]]);
}

#[test]
fn acked_messages_are_not_redelivered_and_unacked_are_marked() {
    let mut h = Harness::new();
    for i in 0..4u8 {
        h.send("bob", &[i]);
    }
    let mut bob = h.connect("bob");
    let batch = bob.batches(&mut h).remove(0);
    assert!(
        batch
            .messages
            .iter()
            .all(|m| !m.redelivered && m.delivery_count == 1)
    );
    bob.handle.ack_through(batch.messages[1].seq);
    bob.handle.ack([batch.messages[3].seq]);
    assert_eq!(bob.close(&mut h), SessionEnd::Closed);

    let mut again = h.connect("bob");
    let redelivered = again.batches(&mut h);
    assert_eq!(payloads(&redelivered), [[2u8]]);
    let message = &redelivered[0].messages[0];
    assert!(message.redelivered);
    assert_eq!(message.delivery_count, 2);
    assert_eq!(message.id, batch.messages[2].id, "same id on redelivery");
}

#[test]
fn acks_of_undelivered_seqs_are_ignored_and_cumulative_acks_are_clamped() {
    let mut h = Harness::new();
    h.send("bob", b"a");
    let mut bob = h.connect("bob");
    bob.batches(&mut h);
    // Bob acks "everything" and a seq he never received: only what he got is removed.
    bob.handle.ack_through(Seq(u64::MAX));
    bob.handle.ack([Seq(123_456)]);
    h.stall();
    let late = h.send("bob", b"b");
    let got = bob.batches(&mut h);
    assert_eq!(
        payloads(&got),
        [b"b"],
        "a message after the clamped ack still arrives"
    );
    assert_eq!(got[0].messages[0].seq, late.seq);
}

#[test]
fn newer_session_displaces_older_and_redelivers_its_unacked() {
    let mut h = Harness::new();
    h.send("bob", b"x");
    let mut phone = h.connect("bob");
    assert_eq!(payloads(&phone.batches(&mut h)), [b"x"]);
    let mut laptop = h.connect("bob");
    assert_eq!(phone.ended(&mut h).unwrap().unwrap(), SessionEnd::Displaced);
    let batches = laptop.batches(&mut h);
    assert_eq!(payloads(&batches), [b"x"]);
    assert!(batches[0].messages[0].redelivered);
    // The displaced session's end leaves the newer one registered and no nudge due.
    assert!(h.queue.is_online(&id("bob")));
    h.advance(Duration::from_secs(3600));
    assert_eq!(h.maintain().nudges, 0);
}

#[test]
fn a_message_never_acked_goes_to_the_dead_letter_hook_after_max_deliveries() {
    let dead = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = dead.clone();
    let mut h = Harness::with(|b| {
        b.max_deliveries(2)
            .on_dead_letter(move |who, delivery| sink.lock().push((who.clone(), delivery)))
    });
    h.send("bob", b"poison");
    h.send("bob", b"fine");
    for _ in 0..2 {
        let mut bob = h.connect("bob");
        assert_eq!(payloads(&bob.batches(&mut h)), [&b"poison"[..], b"fine"]);
        bob.close(&mut h);
    }
    let mut bob = h.connect("bob");
    let batches = bob.batches(&mut h);
    assert!(payloads(&batches).is_empty(), "both reached max_deliveries");
    let gap: u64 = batches.iter().map(|b| b.gap).sum();
    assert_eq!(gap, 2, "the client is told it is short of both");
    let dead = dead.lock();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].1.payload, &b"poison"[..]);
    assert_eq!(dead[0].0, id("bob"));
    assert_eq!(h.queue.metrics().dead_lettered, 2);
    let stats = h.stats("bob");
    assert_eq!(stats.messages, 0, "dead letters are removed");
}

#[test]
fn expired_messages_are_never_delivered_and_are_reported_as_a_gap() {
    let mut h = Harness::new();
    let ttl = |s| Envelope::new(id("bob"), b"short".to_vec()).with_ttl(Duration::from_secs(s));
    h.try_send(ttl(10)).unwrap();
    h.try_send(ttl(10)).unwrap();
    h.send("bob", b"kept");
    h.advance(Duration::from_secs(10));
    // Not purged yet: passed over at read, still reported.
    let mut bob = h.connect("bob");
    let batches = bob.batches(&mut h);
    assert_eq!(payloads(&batches), [b"kept"]);
    assert_eq!(batches[0].gap, 2);
    bob.handle.ack_through(batches[0].messages[0].seq);
    bob.close(&mut h);
    assert_eq!(h.stats("bob").messages, 0, "expired ones removed");

    // Purged while offline: counted, reported once on the next delivery.
    h.try_send(ttl(5)).unwrap();
    h.advance(Duration::from_secs(6));
    assert_eq!(h.maintain().expired, 1);
    h.send("bob", b"after");
    let mut bob = h.connect("bob");
    let batches = bob.batches(&mut h);
    assert_eq!(
        (payloads(&batches), batches[0].gap),
        (vec![b"after".to_vec()], 1)
    );
    // Bob's client never acked that batch: it may never have arrived, so the gap is reported
    // again. Once a message of a batch is acked, its gap is forgotten.
    bob.close(&mut h);
    let mut bob = h.connect("bob");
    let batches = bob.batches(&mut h);
    assert_eq!(batches[0].gap, 1, "unconfirmed gap reported again");
    bob.handle.ack([batches[0].messages[0].seq]);
    bob.close(&mut h);
    h.send("bob", b"later");
    let mut bob = h.connect("bob");
    let batches = bob.batches(&mut h);
    assert_eq!(payloads(&batches), [b"later"]);
    assert_eq!(batches[0].gap, 0, "confirmed by the ack, then forgotten");
    assert_eq!(h.stats("bob").lost, 0);
}

#[test]
fn a_gap_with_no_messages_still_reaches_the_client() {
    let mut h = Harness::new();
    h.try_send(Envelope::new(id("bob"), b"x".to_vec()).with_ttl(Duration::from_secs(1)))
        .unwrap();
    h.advance(Duration::from_secs(2));
    h.maintain();
    let mut bob = h.connect("bob");
    let items = bob.drain(&mut h);
    assert!(
        matches!(&items[0], Outbound::Batch(b) if b.messages.is_empty() && b.gap == 1),
        "{items:?}"
    );
    assert_eq!(items[1], Outbound::CaughtUp);
}

#[test]
fn remaining_ttl_is_what_is_left_at_delivery() {
    let mut h = Harness::new();
    h.try_send(Envelope::new(id("bob"), b"x".to_vec()).with_ttl(Duration::from_secs(100)))
        .unwrap();
    h.advance(Duration::from_secs(30));
    let mut bob = h.connect("bob");
    let message = bob.batches(&mut h).remove(0).messages.remove(0);
    assert_eq!(message.remaining_ttl, Some(Duration::from_secs(70)));
    assert_eq!(
        message.expires_at,
        Some(common::T0.saturating_add(Duration::from_secs(100)))
    );
}

#[test]
fn drop_oldest_reports_the_gap_and_reject_tells_the_sender() {
    let limits = Limits {
        max_messages_per_recipient: 2,
        overflow: Overflow::DropOldest,
        ..Limits::default()
    };
    let mut h = Harness::with(|b| b.limits(limits));
    for i in 0..5u8 {
        h.send("bob", &[i]);
    }
    let mut bob = h.connect("bob");
    let batches = bob.batches(&mut h);
    assert_eq!(
        (payloads(&batches), batches[0].gap),
        (vec![vec![3u8], vec![4]], 3)
    );
    assert_eq!(h.queue.metrics().dropped, 3);

    let limits = Limits {
        max_messages_per_recipient: 2,
        ..Limits::default()
    };
    let mut h = Harness::with(|b| b.limits(limits));
    h.send("bob", b"1");
    h.send("bob", b"2");
    let err = h
        .try_send(Envelope::new(id("bob"), b"3".to_vec()))
        .unwrap_err();
    assert!(matches!(
        err,
        Error::QueueFull {
            max_messages: 2,
            ..
        }
    ));
    assert!(err.is_retryable());
    assert_eq!(h.queue.metrics().rejected_queue_full, 1);
}

#[test]
fn a_sender_chosen_id_is_stored_once() {
    let mut h = Harness::new();
    let mid = MessageId::from_bytes([1; 16]);
    let first = h
        .try_send(Envelope::new(id("bob"), b"x".to_vec()).with_id(mid))
        .unwrap();
    let again = h
        .try_send(Envelope::new(id("bob"), b"x".to_vec()).with_id(mid))
        .unwrap();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!((first.seq, first.id), (again.seq, again.id));
    let mut bob = h.connect("bob");
    assert_eq!(payloads(&bob.batches(&mut h)).len(), 1);
    assert_eq!(h.queue.metrics().duplicates, 1);
}

#[test]
fn nudges_are_coalesced_by_urgency() {
    let policy = NotifyPolicy {
        urgent_cooldown: Duration::from_secs(60),
        background_interval: Duration::from_secs(600),
        unacked_delay: Duration::from_secs(60),
        ..NotifyPolicy::default()
    };
    let mut h = Harness::with(|b| b.notify_policy(policy));
    let send = |h: &mut Harness, urgency| {
        h.try_send(Envelope::new(id("bob"), b"x".to_vec()).with_urgency(urgency))
            .unwrap();
    };
    send(&mut h, Urgency::Urgent);
    send(&mut h, Urgency::Urgent);
    send(&mut h, Urgency::Background);
    let nudges = h.notifier.take();
    assert_eq!(nudges.len(), 1, "one push for a burst");
    assert_eq!(
        (nudges[0].reason, nudges[0].pending),
        (NudgeReason::Urgent, Some(1))
    );
    h.advance(Duration::from_secs(61));
    send(&mut h, Urgency::Background);
    assert!(
        h.notifier.take().is_empty(),
        "background waits its longer period"
    );
    send(&mut h, Urgency::Urgent);
    assert_eq!(h.notifier.take().len(), 1, "urgent after the cooldown");
    h.advance(Duration::from_secs(601));
    send(&mut h, Urgency::Background);
    assert_eq!(h.notifier.take()[0].reason, NudgeReason::Background);
    send(&mut h, Urgency::Silent);
    h.advance(Duration::from_secs(3600));
    send(&mut h, Urgency::Silent);
    assert!(h.notifier.take().is_empty(), "silent never nudges");
    assert_eq!(h.queue.metrics().notifications_sent, 3);
}

#[test]
fn a_nudge_lives_as_long_as_the_message_that_caused_it() {
    let mut h = Harness::with(|b| {
        b.notify_policy(NotifyPolicy {
            urgent_cooldown: Duration::ZERO,
            ..NotifyPolicy::default()
        })
    });
    h.try_send(Envelope::new(id("bob"), b"x".to_vec()).with_ttl(Duration::from_secs(90)))
        .unwrap();
    assert_eq!(h.notifier.take()[0].ttl, Some(Duration::from_secs(90)));
    // Several at once: the longest-lived one, as long as the nudge has a reason to exist.
    let batch = vec![
        Envelope::new(id("carol"), b"a".to_vec()).with_ttl(Duration::from_secs(30)),
        Envelope::new(id("carol"), b"b".to_vec()).with_ttl(Duration::from_secs(300)),
    ];
    let queue = h.queue.clone();
    h.run(queue.send_many(batch)).unwrap();
    assert_eq!(h.notifier.take()[0].ttl, Some(Duration::from_secs(300)));
    // Without a deadline (no TTL and no default), the nudge has none either.
    let mut h = Harness::with(|b| {
        b.limits(offline_queue::Limits {
            default_ttl: None,
            ..offline_queue::Limits::default()
        })
    });
    h.send("dave", b"x");
    assert_eq!(h.notifier.take()[0].ttl, None);
}

#[test]
fn an_online_recipient_is_never_nudged() {
    let mut h = Harness::new();
    let mut bob = h.connect("bob");
    let receipt = h.send("bob", b"x");
    assert!(receipt.recipient_online);
    assert!(h.notifier.take().is_empty());
    assert_eq!(payloads(&bob.batches(&mut h)), [b"x"]);
}

#[test]
fn a_session_that_ends_with_unacked_messages_earns_one_delayed_nudge() {
    let mut h = Harness::new();
    h.send("bob", b"x");
    h.notifier.take();
    let mut bob = h.connect("bob");
    bob.batches(&mut h);
    bob.close(&mut h);
    h.advance(Duration::from_secs(59));
    assert_eq!(h.maintain().nudges, 0, "not before the delay");
    h.advance(Duration::from_secs(1));
    assert_eq!(h.maintain().nudges, 1);
    let nudges = h.notifier.take();
    assert_eq!(
        (nudges[0].reason, nudges[0].pending),
        (NudgeReason::Unacked, Some(1))
    );
    h.advance(Duration::from_secs(120));
    assert_eq!(h.maintain().nudges, 0, "once");

    // Acked everything: no nudge. Reconnected before the delay: no nudge.
    let mut bob = h.connect("bob");
    let batch = bob.batches(&mut h).remove(0);
    bob.handle.ack_through(batch.messages[0].seq);
    bob.close(&mut h);
    h.send("bob", b"y");
    h.notifier.take();
    let mut bob = h.connect("bob");
    bob.batches(&mut h);
    bob.close(&mut h);
    let _back = h.connect("bob");
    h.advance(Duration::from_secs(120));
    assert_eq!(h.maintain().nudges, 0);
}

#[test]
fn a_failing_notifier_never_fails_a_send() {
    struct Failing(AtomicUsize);
    impl Notifier for Failing {
        fn notify(&self, _: Nudge) -> Result<(), NotifyError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(NotifyError("push service down".into()))
        }
    }
    let failing = Arc::new(Failing(AtomicUsize::new(0)));
    let mut h = Harness::with(|b| b.notifier(failing.clone()));
    h.send("bob", b"x");
    assert_eq!(failing.0.load(Ordering::SeqCst), 1);
    assert_eq!(h.queue.metrics().notifications_failed, 1);
    let mut bob = h.connect("bob");
    assert_eq!(
        payloads(&bob.batches(&mut h)),
        [b"x"],
        "stored all the same"
    );
}

#[test]
fn ephemeral_messages_reach_only_a_live_session_and_are_never_stored() {
    let mut h = Harness::new();
    assert!(
        !h.queue
            .send_ephemeral(&id("bob"), b"typing".to_vec())
            .unwrap()
    );
    assert!(h.notifier.take().is_empty());
    let mut bob = h.connect("bob");
    bob.drain(&mut h);
    assert!(
        h.queue
            .send_ephemeral(&id("bob"), b"typing".to_vec())
            .unwrap()
    );
    let items = bob.drain(&mut h);
    assert!(matches!(&items[..], [Outbound::Ephemeral(e)] if e.payload == b"typing"));
    assert_eq!(h.stats("bob").messages, 0);
    let big = vec![0; h.queue.limits().max_message_bytes + 1];
    assert!(matches!(
        h.queue.send_ephemeral(&id("bob"), big),
        Err(Error::MessageTooLarge { .. })
    ));
}

#[test]
fn a_dropped_session_future_leaves_nothing_behind() {
    let h = Harness::new();
    let (transport, _inbox) = offline_queue::channel_transport(1);
    let session = h.queue.connect(id("bob"), transport);
    assert!(h.queue.is_online(&id("bob")));
    drop(session);
    assert!(!h.queue.is_online(&id("bob")));
    assert_eq!(h.queue.metrics().live_sessions, 0);
}

#[test]
fn a_closed_transport_ends_the_session_and_keeps_the_messages() {
    let mut h = Harness::new();
    h.send("bob", b"x");
    let (transport, inbox) = offline_queue::channel_transport(1);
    drop(inbox);
    let session = h.queue.connect(id("bob"), transport);
    let end = h.run(session.run()).unwrap();
    assert!(matches!(end, SessionEnd::TransportClosed(_)));
    assert!(!h.queue.is_online(&id("bob")));
    assert_eq!(h.stats("bob").messages, 1);
}

#[test]
fn idle_queues_are_removed_by_maintenance() {
    let limits = Limits {
        idle_recipient_timeout: Some(Duration::from_secs(3600)),
        default_ttl: None,
        ..Limits::default()
    };
    let mut h = Harness::with(|b| b.limits(limits));
    h.send("abandoned", b"x");
    h.advance(Duration::from_secs(1800));
    h.send("active", b"y");
    h.advance(Duration::from_secs(1801));
    let report = h.maintain();
    assert_eq!(report.idle_recipients, 1);
    assert_eq!(h.stats("abandoned").messages, 0);
    assert_eq!(h.stats("active").messages, 1);
}

#[test]
fn nudge_memory_is_bounded_by_recently_nudged_recipients() {
    let mut h = Harness::new();
    for i in 0..1000 {
        h.send(&format!("user{i}"), b"x");
    }
    assert!(h.queue.nudge_state_len() >= 1000);
    h.advance(NotifyPolicy::default().background_interval + Duration::from_secs(1));
    h.maintain();
    assert_eq!(
        h.queue.nudge_state_len(),
        0,
        "forgotten after the longest period"
    );
}

#[test]
fn nudge_memory_is_bounded_by_a_count_too() {
    let policy = NotifyPolicy {
        max_tracked_recipients: 100,
        ..NotifyPolicy::default()
    };
    let mut h = Harness::with(|b| b.notify_policy(policy));
    // A thousand distinct offline recipients within one cooldown: each is nudged, and only
    // the newest hundred are remembered.
    for i in 0..1000 {
        h.send(&format!("user{i}"), b"x");
    }
    assert_eq!(h.notifier.take().len(), 1000);
    assert!(
        h.queue.nudge_state_len() <= 2 * 100,
        "{}",
        h.queue.nudge_state_len()
    );
    // Forgotten early, the oldest is nudged again (a push too many, never one too few); the
    // newest is still within its cooldown.
    h.send("user0", b"y");
    h.send("user999", b"y");
    let again: Vec<_> = h.notifier.take().into_iter().map(|n| n.recipient).collect();
    assert_eq!(again, vec![id("user0")]);

    // 150 sessions end with messages unacked: the oldest 50 delayed nudges are forgotten, and
    // counted as failed notifications.
    let failed = h.queue.metrics().notifications_failed;
    for i in 0..150 {
        let who = format!("away{i}");
        h.send(&who, b"z");
        let mut client = h.connect(&who);
        assert_eq!(client.batches(&mut h).len(), 1);
        client.close(&mut h);
    }
    h.notifier.take();
    assert_eq!(h.queue.metrics().notifications_failed - failed, 50);
    assert!(
        h.queue.nudge_state_len() <= 3 * 100,
        "{}",
        h.queue.nudge_state_len()
    );
    h.advance(NotifyPolicy::default().unacked_delay + Duration::from_secs(1));
    h.maintain();
    let delayed: Vec<_> = h.notifier.take().into_iter().map(|n| n.recipient).collect();
    assert_eq!(delayed.len(), 100);
    assert_eq!(delayed[0], id("away50"), "the newest hundred are kept");
}

#[test]
fn introspection_peek_stats_and_remove() {
    let mut h = Harness::new();
    h.send("bob", b"one");
    h.advance(Duration::from_secs(5));
    h.send("bob", b"two");
    let stats = h.stats("bob");
    assert_eq!(
        (stats.messages, stats.oldest_age),
        (2, Some(Duration::from_secs(5)))
    );
    let peeked = {
        let q = h.queue.clone();
        h.run(q.peek(&id("bob"), 1)).unwrap()
    };
    assert_eq!(peeked.len(), 1);
    assert!(!peeked[0].redelivered);
    let mut bob = h.connect("bob");
    let batch = bob.batches(&mut h).remove(0);
    assert!(
        !batch.messages[0].redelivered,
        "peek does not count as a delivery"
    );
    bob.close(&mut h);
    assert_eq!(
        {
            let q = h.queue.clone();
            h.run(q.remove_recipient(&id("bob"))).unwrap()
        },
        2
    );
    assert_eq!(h.stats("bob").messages, 0);
}

#[test]
fn send_many_validates_everything_first_and_stores_each_recipient_atomically() {
    let limits = Limits {
        max_messages_per_recipient: 2,
        ..Limits::default()
    };
    let mut h = Harness::with(|b| b.limits(limits));
    let e = |to: &str, body: &[u8]| Envelope::new(id(to), body.to_vec());
    let queue = h.queue.clone();
    let invalid = h.run(queue.send_many(vec![e("a", b"1"), e("b", b"2").with_ttl(Duration::ZERO)]));
    assert!(matches!(invalid, Err(Error::TtlZero)));
    assert_eq!(
        h.run(queue.stats(&id("a"))).unwrap().messages,
        0,
        "nothing stored"
    );

    let results = h
        .run(queue.send_many(vec![
            e("a", b"1"),
            e("b", b"1"),
            e("a", b"2"),
            e("b", b"2"),
            e("b", b"3"),
        ]))
        .unwrap();
    assert!(results[0].is_ok() && results[2].is_ok());
    assert!(results[0].as_ref().unwrap().seq < results[2].as_ref().unwrap().seq);
    for i in [1, 3, 4] {
        assert!(
            matches!(results[i], Err(Error::QueueFull { .. })),
            "b's three do not fit: all rejected"
        );
    }
    assert_eq!(h.run(queue.stats(&id("b"))).unwrap().messages, 0);
}

#[test]
fn typed_payloads_round_trip_through_the_codec() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Chat {
        from: String,
        text: String,
    }
    let mut h = Harness::new();
    let chat = Chat {
        from: "alice".into(),
        text: "hi".into(),
    };
    h.try_send(Envelope::encode(id("bob"), &chat).unwrap())
        .unwrap();
    let mut bob = h.connect("bob");
    let message = bob.batches(&mut h).remove(0).messages.remove(0);
    assert_eq!(message.decode::<Chat>().unwrap(), chat);
    assert!(matches!(
        message.decode::<(u64, u64, u64)>(),
        Err(Error::Codec(_))
    ));
}

#[cfg(feature = "compression")]
#[test]
fn large_payloads_are_compressed_in_storage_and_delivered_intact() {
    let mut h = Harness::with(|b| b.compress_above(256));
    let payload: Vec<u8> = b"the same line again and again\n".repeat(200);
    h.send("bob", &payload);
    let stats = h.stats("bob");
    assert!(
        stats.bytes < payload.len() as u64 / 4,
        "stored {} bytes",
        stats.bytes
    );
    let mut bob = h.connect("bob");
    assert_eq!(payloads(&bob.batches(&mut h)), [payload]);
}

#[test]
fn metrics_count_the_path() {
    let mut h = Harness::new();
    h.send("bob", b"x");
    h.send("bob", b"y");
    let mut bob = h.connect("bob");
    let batch = bob.batches(&mut h).remove(0);
    bob.handle.ack_through(batch.messages[1].seq);
    h.stall();
    let m = h.queue.metrics();
    assert_eq!(
        (m.stored, m.delivered, m.acked, m.live_sessions),
        (2, 2, 2, 1)
    );
    assert_eq!((m.notifications_sent, m.notifications_coalesced), (1, 1));
    assert!(m.iter().any(|(name, value)| name == "stored" && value == 2));
}

#[test]
fn a_message_stored_while_online_still_earns_a_nudge_if_the_connection_dies_before_delivery() {
    let mut h = Harness::new();
    let bob = h.connect("bob");
    h.stall();
    // The phone vanished: the transport will fail on the next hand-over.
    drop(bob.inbox);
    let receipt = h.send("bob", b"x");
    assert!(
        receipt.recipient_online,
        "stored while the session was registered"
    );
    assert!(
        h.notifier.take().is_empty(),
        "no push for an online recipient"
    );
    h.stall();
    assert!(
        !h.queue.is_online(&id("bob")),
        "the failed transport ended the session"
    );
    h.advance(Duration::from_secs(60));
    assert_eq!(
        h.maintain().nudges,
        1,
        "the pending message earns its nudge"
    );
}

#[test]
fn a_skipped_delayed_nudge_does_not_silence_the_next_push() {
    let mut h = Harness::new();
    h.send("bob", b"x");
    h.notifier.take();
    let mut bob = h.connect("bob");
    bob.batches(&mut h);
    bob.close(&mut h); // ended with x unacked: a delayed nudge is due at +60 s
    h.advance(Duration::from_secs(10));
    let mut bob = h.connect("bob"); // back online before it is due
    let batch = bob.batches(&mut h).remove(0);
    h.advance(Duration::from_secs(50));
    assert_eq!(h.maintain().nudges, 0, "online: skipped");
    bob.handle.ack_through(batch.messages[0].seq);
    bob.close(&mut h);
    h.advance(Duration::from_secs(10));
    h.send("bob", b"urgent");
    assert_eq!(
        h.notifier.take().len(),
        1,
        "the skipped nudge did not count as sent"
    );
}

#[test]
fn a_message_stored_under_a_larger_limit_is_delivered_after_the_limit_is_lowered() {
    let storage: Arc<dyn offline_queue::Storage> = Arc::new(offline_queue::MemoryStorage::new());
    let mut before = Harness::with(|b| b.storage(storage.clone()));
    let big = vec![9u8; 60_000];
    before.send("bob", &big);
    let small = Limits {
        max_message_bytes: 1_000,
        ..Limits::default()
    };
    let mut after = Harness::with(|b| b.storage(storage).limits(small));
    let mut bob = after.connect("bob");
    let batches = bob.batches(&mut after);
    assert_eq!(
        payloads(&batches),
        [big],
        "kept and delivered, not discarded as corrupt"
    );
    assert_eq!(after.queue.metrics().corrupt, 0);
}

#[test]
fn an_expired_dedup_entry_never_swallows_a_new_message_even_after_a_clock_step_back() {
    let limits = Limits {
        dedup_window: Duration::from_secs(60),
        ..Limits::default()
    };
    let mut h = Harness::with(|b| b.limits(limits));
    let with_id = |n: u8| Envelope::new(id("bob"), vec![n]).with_id(MessageId::from_bytes([n; 16]));
    h.advance(Duration::from_secs(100));
    h.try_send(with_id(1)).unwrap();
    h.clock.set(common::T0); // the wall clock steps back 100 s
    h.try_send(with_id(2)).unwrap();
    h.advance(Duration::from_secs(130)); // id 2 is 130 s old, id 1 only 30 s
    let again = h.try_send(with_id(2)).unwrap();
    assert!(!again.duplicate, "id 2 left the window: stored again");
    let dup = h.try_send(with_id(1)).unwrap();
    assert!(dup.duplicate, "id 1 is still within the window");
}

#[test]
fn acking_with_an_iterator_that_calls_back_into_the_queue_does_not_deadlock() {
    let mut h = Harness::new();
    h.send("bob", b"x");
    let mut bob = h.connect("bob");
    let seq = bob.batches(&mut h)[0].messages[0].seq;
    let queue = h.queue.clone();
    let handle = bob.handle.clone();
    bob.handle.ack(std::iter::once(seq).inspect(|_| {
        assert!(queue.is_online(&id("bob")));
        handle.ack_through(seq);
    }));
    h.stall();
    assert_eq!(h.stats("bob").messages, 0);
}

#[test]
fn a_gap_only_batch_is_confirmed_by_the_ack_of_a_later_message() {
    let mut h = Harness::new();
    h.try_send(Envelope::new(id("bob"), b"x".to_vec()).with_ttl(Duration::from_secs(1)))
        .unwrap();
    h.advance(Duration::from_secs(2));
    let mut bob = h.connect("bob");
    let first = bob.batches(&mut h).remove(0);
    assert!(first.messages.is_empty());
    assert_eq!(first.gap, 1);
    bob.close(&mut h);
    // Not acked: the batch may never have arrived, so the next connection hears it again.
    let mut bob = h.connect("bob");
    let again = bob.batches(&mut h).remove(0);
    assert_eq!(again.gap, 1);
    // Acking its position proves nothing (an earlier batch may share it): still pending.
    bob.handle.ack_through(again.position);
    h.send("bob", b"later");
    let later = bob.batches(&mut h).remove(0);
    assert_eq!(later.gap, 0, "not reported twice on one connection");
    bob.handle.ack_through(later.position);
    bob.close(&mut h);
    let mut bob = h.connect("bob");
    assert_eq!(
        bob.drain(&mut h),
        [Outbound::CaughtUp],
        "confirmed by the later ack: never reported again"
    );
}

/// A record this build cannot read (lz4-compressed, `compression` off) is kept however often
/// a session meets it: never dead-lettered, never passed over. What precedes it in its batch
/// is still handed over, and the session ends with the error.
#[cfg(not(feature = "compression"))]
#[test]
fn a_record_this_build_cannot_read_is_kept_not_dead_lettered() {
    use offline_queue::storage::NewRecord;
    use offline_queue::{
        Error, MemoryStorage, Outbound, Quota, Storage, Timestamp, channel_transport,
    };

    let storage = Arc::new(MemoryStorage::new());
    let queue = offline_queue::OfflineQueue::builder()
        .storage(storage.clone())
        .max_deliveries(2)
        .build()
        .unwrap();
    let bob = id("bob");
    let now = queue.now();
    let record = |body: &[u8]| NewRecord {
        id: offline_queue::MessageId::generate(),
        dedup: false,
        sent_at: now,
        expires_at: None,
        body: body.to_vec(),
    };
    // Tag 0: raw; tag 1: an lz4 block this build cannot decode.
    let records = vec![record(b"readable\0"), record(b"\x10\0\0\0\0\x01")];
    futures::executor::block_on(storage.append(&bob, records, &Quota::UNLIMITED, now)).unwrap();
    for round in 0..4 {
        let (transport, mut items) = channel_transport(16);
        let session = queue.connect(bob.clone(), transport);
        let end = futures::executor::block_on(session.run());
        assert!(
            matches!(end, Err(Error::UnsupportedRecord { .. })),
            "round {round}: {end:?}"
        );
        let mut delivered = Vec::new();
        while let Ok(item) = items.try_recv() {
            if let Outbound::Batch(batch) = item {
                delivered.extend(batch.messages.iter().map(|m| m.payload.to_vec()));
            }
        }
        let expected: Vec<Vec<u8>> = if round < 2 {
            vec![b"readable".to_vec()]
        } else {
            vec![] // the readable one reached max_deliveries: a dead letter
        };
        assert_eq!(delivered, expected, "round {round}");
    }
    let left = futures::executor::block_on(storage.read(
        &bob,
        None,
        offline_queue::BatchLimit::default(),
        Timestamp::from_millis(now.as_millis()),
    ))
    .unwrap();
    assert_eq!(
        left.records.len(),
        1,
        "the unreadable record is still stored"
    );
    assert_eq!(left.records[0].body[..], b"\x10\0\0\0\0\x01"[..]);
    assert_eq!(queue.metrics().dead_lettered, 1, "only the readable one");
}

#[test]
fn the_wakeup_listener_ends_once_the_engine_is_dropped() {
    use futures::FutureExt;
    let queue = offline_queue::OfflineQueue::builder()
        .shared_storage(Arc::new(common::Shaped::new()))
        .build()
        .unwrap();
    let mut listener = Box::pin(queue.wakeup_listener());
    assert_eq!(
        (&mut listener).now_or_never(),
        None,
        "waits while the engine lives"
    );
    // The storage, and with it the wake-up stream's sender, goes with the last handle.
    drop(queue);
    assert_eq!(listener.now_or_never(), Some(()));
}

/// Acks as each batch arrives and closes the session at the first: the close is seen before
/// the rest of the backlog is read, though every ack frees the window.
#[test]
fn a_close_during_a_drain_ends_it_at_once() {
    use std::sync::OnceLock;
    struct AckAndClose(
        Arc<OnceLock<offline_queue::SessionHandle>>,
        Arc<AtomicUsize>,
    );
    #[async_trait::async_trait]
    impl offline_queue::Transport for AckAndClose {
        async fn send(&self, item: Outbound) -> Result<(), offline_queue::TransportClosed> {
            if let Outbound::Batch(batch) = item {
                self.1.fetch_add(1, Ordering::SeqCst);
                let handle = self.0.get().unwrap();
                handle.ack_through(batch.position);
                handle.close();
            }
            Ok(())
        }
    }
    let mut h = Harness::with(|b| {
        b.batch(BatchLimit {
            max_messages: 10,
            max_bytes: 1 << 20,
        })
    });
    for i in 0..100u8 {
        h.send("bob", &[i]);
    }
    let (handle, batches) = (Arc::new(OnceLock::new()), Arc::new(AtomicUsize::new(0)));
    let session = h
        .queue
        .connect(id("bob"), AckAndClose(handle.clone(), batches.clone()));
    handle.set(session.handle()).unwrap();
    let end = h.run(session.run()).unwrap();
    assert_eq!(end, SessionEnd::Closed);
    assert_eq!(
        batches.load(Ordering::SeqCst),
        1,
        "no batch after the close"
    );
    assert_eq!(
        h.stats("bob").messages,
        90,
        "the first batch's ack still counted"
    );
}

/// Acks and an ephemeral message wait together, and the transport fails on the ephemeral:
/// the acks are applied all the same.
#[test]
fn acks_waiting_with_an_ephemeral_survive_a_failing_transport() {
    struct FailsOnEphemeral(Arc<parking_lot::Mutex<Vec<offline_queue::Batch>>>);
    #[async_trait::async_trait]
    impl offline_queue::Transport for FailsOnEphemeral {
        async fn send(&self, item: Outbound) -> Result<(), offline_queue::TransportClosed> {
            match item {
                Outbound::Batch(batch) => self.0.lock().push(batch),
                Outbound::Ephemeral(_) => {
                    return Err(offline_queue::TransportClosed("gone".into()));
                }
                _ => {}
            }
            Ok(())
        }
    }
    let mut h = Harness::new();
    for i in 0..3u8 {
        h.send("bob", &[i]);
    }
    let batches = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let session = h
        .queue
        .connect(id("bob"), FailsOnEphemeral(batches.clone()));
    let handle = session.handle();
    let (tx, mut end) = futures::channel::oneshot::channel();
    use futures::task::LocalSpawnExt;
    h.pool
        .spawner()
        .spawn_local(async move {
            let _ = tx.send(session.run().await);
        })
        .unwrap();
    h.stall();
    let position = batches.lock()[0].position;
    handle.ack_through(position);
    assert!(h.queue.send_ephemeral(&id("bob"), "typing").unwrap());
    h.stall();
    let ended = end.try_recv().unwrap().expect("the session ended").unwrap();
    assert!(matches!(ended, SessionEnd::TransportClosed(_)), "{ended:?}");
    assert_eq!(h.stats("bob").messages, 0, "the acks were applied");
}
