//! Which front-end counts, found per recipient and per message (`count_on = "auto"`).
//!
//! R13's delivered sizes and R14's sending counters (with R15's pattern) must be counted
//! once per recipient and per message, however Postfix is wired: to the policy service, to
//! the milter, or to both (and a site may wire its ports differently). Postfix asks the
//! policy service first at both places where they overlap: at RCPT it evaluates
//! `smtpd_recipient_restrictions` before it sends the recipient to its milters, and at the
//! end of DATA `smtpd_end_of_data_restrictions` before it hands the message to the cleanup
//! server, which runs the milters' end of message. So with `"auto"` the policy service
//! counts whatever it is asked about and leaves a mark here (this daemon's memory: both
//! front-ends of one daemon share it), and the milter counts what carries no mark: a
//! recipient the policy service did not judge moments before (same client address, sender
//! and recipient), a message whose end it was not asked about (same queue id).
//!
//! The milter takes one mark per recipient, so each policy judgement stands for exactly one
//! milter recipient and nothing is counted twice or skipped, even when two sessions of the
//! same client send the same sender and recipient at once. Marks nobody takes (the policy
//! service alone is wired, or a later restriction refused the recipient) expire after
//! [`GENERATION`] to 2×[`GENERATION`], and there are at most 2×[`MAX_MARKS`] of them.

use crate::model::{Address, Transaction};
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long a generation of marks is kept before it is rotated out (a mark lives one to two
/// of these). Far above the time between Postfix's policy request and its milter event for
/// the same recipient (the restrictions after the policy service, bounded by Postfix's own
/// timeouts).
pub const GENERATION: Duration = Duration::from_secs(300);

/// Marks per generation; a full generation is rotated early (a bound on memory).
pub const MAX_MARKS: usize = 50_000;

/// What the policy service judged, for the milter (see the module docs).
#[derive(Debug)]
pub struct Handoff {
    marks: Mutex<Generations>,
}

#[derive(Debug)]
struct Generations {
    current: HashMap<String, u32>,
    previous: HashMap<String, u32>,
    since: Instant,
}

impl Default for Handoff {
    fn default() -> Self {
        Handoff::new(Instant::now())
    }
}

impl Handoff {
    fn new(now: Instant) -> Handoff {
        Handoff {
            marks: Mutex::new(Generations {
                current: HashMap::new(),
                previous: HashMap::new(),
                since: now,
            }),
        }
    }

    /// The policy service judged `rcpt` of `tx`, and counted it.
    pub fn rcpt_judged(&self, tx: &Transaction, rcpt: &Address) {
        self.mark(rcpt_key(tx, rcpt), Instant::now());
    }

    /// Whether the policy service judged `rcpt` of `tx` (the mark is taken).
    pub fn take_rcpt(&self, tx: &Transaction, rcpt: &Address) -> bool {
        self.take(&rcpt_key(tx, rcpt), Instant::now())
    }

    /// The policy service judged the end of the message `queue_id`.
    pub fn message_judged(&self, queue_id: &str) {
        self.mark(message_key(queue_id), Instant::now());
    }

    /// Whether the policy service judged the end of the message `queue_id` (taken).
    pub fn take_message(&self, queue_id: &str) -> bool {
        self.take(&message_key(queue_id), Instant::now())
    }

    fn mark(&self, key: String, now: Instant) {
        let mut g = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        g.rotate(now);
        if g.current.len() >= MAX_MARKS {
            g.previous = std::mem::take(&mut g.current);
            g.since = now;
        }
        *g.current.entry(key).or_default() += 1;
    }

    fn take(&self, key: &str, now: Instant) -> bool {
        let mut g = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        g.rotate(now);
        let Generations {
            current, previous, ..
        } = &mut *g;
        for map in [current, previous] {
            if let Some(n) = map.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
                return true;
            }
        }
        false
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self.marks.lock().unwrap();
        g.current.len() + g.previous.len()
    }
}

impl Generations {
    fn rotate(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.since);
        if age >= GENERATION * 2 {
            self.previous.clear();
            self.current.clear();
            self.since = now;
        } else if age >= GENERATION {
            self.previous = std::mem::take(&mut self.current);
            self.since = now;
        }
    }
}

/// A recipient as both front-ends see it: client address, envelope sender, recipient.
/// (Postfix gives the policy service no client port to tell two sessions apart; taking one
/// mark per recipient keeps the counts right anyway, see the module docs.)
fn rcpt_key(tx: &Transaction, rcpt: &Address) -> String {
    let client = tx.client_addr.map(|ip| ip.to_string()).unwrap_or_default();
    let sender = match &tx.sender {
        None | Some(crate::model::Sender::Null) => String::new(),
        Some(crate::model::Sender::Address(a)) => a.to_string(),
        Some(crate::model::Sender::Unparsed(s)) => s.clone(),
    };
    format!("r\0{client}\0{sender}\0{rcpt}")
}

fn message_key(queue_id: &str) -> String {
    format!("m\0{queue_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, Sender};

    fn tx(client: &str, sender: &str) -> Transaction {
        let mut tx = Transaction::new(Protocol::Policy);
        tx.client_addr = Some(client.parse().unwrap());
        tx.sender = Some(Sender::parse(sender));
        tx
    }

    fn addr(a: &str) -> Address {
        a.parse().unwrap()
    }

    #[test]
    fn each_judgement_stands_for_one_milter_recipient() {
        let h = Handoff::default();
        let (t, r) = (tx("192.0.2.1", "champa@mpt.gov.la"), addr("a@example.org"));
        assert!(!h.take_rcpt(&t, &r), "nothing judged yet");
        h.rcpt_judged(&t, &r);
        h.rcpt_judged(&t, &r);
        assert!(h.take_rcpt(&t, &r));
        assert!(h.take_rcpt(&t, &r));
        assert!(!h.take_rcpt(&t, &r), "two judgements, two recipients");
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn client_sender_and_recipient_all_tell_recipients_apart() {
        let h = Handoff::default();
        h.rcpt_judged(
            &tx("192.0.2.1", "champa@mpt.gov.la"),
            &addr("a@example.org"),
        );
        assert!(!h.take_rcpt(
            &tx("192.0.2.2", "champa@mpt.gov.la"),
            &addr("a@example.org")
        ));
        assert!(!h.take_rcpt(
            &tx("192.0.2.1", "somsak@mpt.gov.la"),
            &addr("a@example.org")
        ));
        assert!(!h.take_rcpt(
            &tx("192.0.2.1", "champa@mpt.gov.la"),
            &addr("b@example.org")
        ));
        assert!(!h.take_rcpt(&tx("192.0.2.1", "<>"), &addr("a@example.org")));
        assert!(h.take_rcpt(
            &tx("192.0.2.1", "champa@mpt.gov.la"),
            &addr("a@example.org")
        ));
    }

    #[test]
    fn messages_are_told_apart_by_queue_id() {
        let h = Handoff::default();
        h.message_judged("4ABC123");
        assert!(!h.take_message("4ABC124"));
        assert!(h.take_message("4ABC123"));
        assert!(!h.take_message("4ABC123"));
    }

    #[test]
    fn marks_expire_after_one_to_two_generations() {
        let t0 = Instant::now();
        let h = Handoff::new(t0);
        h.mark(message_key("old"), t0);
        h.mark(message_key("older"), t0);
        // Rotated into the previous generation: still there.
        let t1 = t0 + GENERATION;
        h.mark(message_key("new"), t1);
        assert!(h.take(&message_key("old"), t1));
        // The next rotation drops it.
        let t2 = t1 + GENERATION;
        assert!(!h.take(&message_key("older"), t2));
        assert!(h.take(&message_key("new"), t2));
        // Long idle: everything goes.
        h.mark(message_key("idle"), t2);
        assert!(!h.take(&message_key("idle"), t2 + GENERATION * 2));
    }

    #[test]
    fn marks_are_bounded() {
        let t0 = Instant::now();
        let h = Handoff::new(t0);
        for i in 0..MAX_MARKS * 3 {
            h.mark(message_key(&i.to_string()), t0);
        }
        assert!(h.len() <= 2 * MAX_MARKS, "{}", h.len());
        // The newest are kept.
        assert!(h.take(&message_key(&(MAX_MARKS * 3 - 1).to_string()), t0));
    }
}
