//! Compromise response (R15): the per-account sending pattern the store keeps, the locks
//! it stores, and the arithmetic both backends share (the Redis script mirrors
//! [`WatchState::count_message`] and friends line by line).
//!
//! # Baseline
//!
//! An account's baseline is an exponentially weighted moving average of its **messages per
//! UTC hour**, idle hours included, kept in thousandths of a message (integers, so SQLite
//! and Redis's Lua compute the very same value). When the first message of a new hour is
//! counted, the finished hour's count `c` is folded in — `b += floor((1000·c − b) / N)` —
//! and every idle hour in between decays it — `b −= floor(b / N)` — where `N` is
//! `[rules.R15] baseline_hours` (default one week). After more than `8·N` idle hours the
//! baseline is 0.
//!
//! # Triggers
//!
//! - **Burst**: the messages of the current hour pass `max(burst_floor,
//!   burst_factor × baseline)`. The floor keeps a new or quiet account (baseline ≈ 0) from
//!   being locked by its first few messages.
//! - **Rejected recipients**: in the current UTC hour at least `reject_min` recipients were
//!   refused and they are at least `reject_share` percent of all its recipients (accepted +
//!   refused).
//!
//! The check runs inside the same atomic step as R14's counters ([`super::Store::take_watched`]:
//! one SQLite transaction, one Lua script on Redis with every key in the account's hash
//! slot), so several daemons sharing the store see one pattern and one lock.

use super::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Who locked an account automatically (the `by` of a [`SendLock`]).
pub const AUTOMATIC: &str = "R15";

/// R15's thresholds, from `[rules.R15]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    /// A burst is more than this many times the baseline...
    pub burst_factor: u64,
    /// ...and more than this many messages in the hour.
    pub burst_floor: u64,
    /// The baseline's horizon in hours (`N` above).
    pub baseline_hours: u64,
    /// Percent of refused recipients in the hour that locks...
    pub reject_share: u64,
    /// ...once at least this many were refused.
    pub reject_min: u64,
    /// Store the lock (`enforce`); `false` (`monitor`) only reports what would happen.
    pub lock: bool,
}

impl Watch {
    pub const DEFAULT: Watch = Watch {
        burst_factor: 10,
        burst_floor: 60,
        baseline_hours: 168,
        reject_share: 50,
        reject_min: 20,
        lock: true,
    };

    /// The burst threshold for a baseline (thousandths of a message per hour).
    pub fn burst_threshold(&self, baseline_milli: u64) -> u64 {
        self.burst_floor
            .max(self.burst_factor.saturating_mul(baseline_milli) / 1000)
    }
}

/// What the store keeps per account (all 0 for an account never seen).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchState {
    /// Start of the UTC hour `messages` counts (0: never counted).
    pub hour: Timestamp,
    pub messages: u64,
    /// Messages per hour before `hour`, in thousandths.
    pub baseline_milli: u64,
    /// Start of the UTC hour `accepted` and `rejected` count.
    pub rej_hour: Timestamp,
    pub accepted: u64,
    pub rejected: u64,
}

fn hour_of(now: Timestamp) -> Timestamp {
    now - now.rem_euclid(3600)
}

impl WatchState {
    /// Moves the message count to the hour of `now`, folding the hours that ended into the
    /// baseline. An instance whose clock lags (an hour before `hour`) counts into `hour`.
    pub fn roll(&mut self, now: Timestamp, baseline_hours: u64) {
        let h = hour_of(now);
        let n = baseline_hours.max(1) as i64;
        if self.hour == 0 {
            self.hour = h;
            self.messages = 0;
        } else if self.hour < h {
            let mut b = self.baseline_milli as i64;
            b += (self.messages as i64 * 1000 - b).div_euclid(n);
            let idle = (h - self.hour) / 3600 - 1;
            if idle > 8 * n {
                b = 0;
            } else {
                for _ in 0..idle {
                    b -= b.div_euclid(n);
                }
            }
            self.baseline_milli = b.max(0) as u64;
            self.hour = h;
            self.messages = 0;
        }
    }

    /// Moves the recipient counts to the hour of `now` (fixed UTC hours, like R14's).
    pub fn roll_recipients(&mut self, now: Timestamp) {
        let h = hour_of(now);
        if self.rej_hour < h {
            self.rej_hour = h;
            self.accepted = 0;
            self.rejected = 0;
        }
    }

    /// One accepted recipient (and, with `message`, one message) at `now`; the burst it
    /// makes, if any.
    pub fn count_accepted(
        &mut self,
        w: &Watch,
        message: bool,
        now: Timestamp,
    ) -> Option<LockCause> {
        self.roll(now, w.baseline_hours);
        self.roll_recipients(now);
        self.accepted += 1;
        if !message {
            return None;
        }
        self.messages += 1;
        let threshold = w.burst_threshold(self.baseline_milli);
        (self.messages > threshold).then_some(LockCause::Burst {
            messages: self.messages,
            baseline_milli: self.baseline_milli,
            threshold,
        })
    }

    /// One refused recipient at `now`; the lock it calls for, if any.
    pub fn count_rejected(&mut self, w: &Watch, now: Timestamp) -> Option<LockCause> {
        self.roll_recipients(now);
        self.rejected += 1;
        let total = self.accepted + self.rejected;
        (self.rejected >= w.reject_min.max(1)
            && self.rejected.saturating_mul(100) >= w.reject_share.saturating_mul(total))
        .then_some(LockCause::Rejections {
            rejected: self.rejected,
            total,
        })
    }
}

/// Why an account is locked for sending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "lowercase")]
pub enum LockCause {
    /// `messages` in the UTC hour passed `threshold` (baseline in thousandths per hour).
    Burst {
        messages: u64,
        baseline_milli: u64,
        threshold: u64,
    },
    /// `rejected` of `total` recipients in the UTC hour were refused.
    Rejections { rejected: u64, total: u64 },
    /// Locked by an administrator.
    Manual { reason: String },
}

impl LockCause {
    /// `burst`, `rejections`, `manual`: the metric label and audit word.
    pub fn kind(&self) -> &'static str {
        match self {
            LockCause::Burst { .. } => "burst",
            LockCause::Rejections { .. } => "rejections",
            LockCause::Manual { .. } => "manual",
        }
    }
}

impl fmt::Display for LockCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockCause::Burst {
                messages,
                baseline_milli,
                threshold,
            } => write!(
                f,
                "sending burst: {messages} messages in one hour, usual {}.{:03} per hour, threshold {threshold}",
                baseline_milli / 1000,
                baseline_milli % 1000
            ),
            LockCause::Rejections { rejected, total } => write!(
                f,
                "refused recipients: {rejected} of {total} recipients in one hour were refused"
            ),
            LockCause::Manual { reason } => write!(f, "locked by an administrator: {reason}"),
        }
    }
}

/// A stored lock: the account may not send until it is released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendLock {
    pub at: Timestamp,
    /// [`AUTOMATIC`] or the admin token's name.
    pub by: String,
    #[serde(flatten)]
    pub cause: LockCause,
}

/// The answer of [`super::Store::take_watched`] and [`super::Store::count_rejected`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchOutcome {
    /// The account is not locked; the outcome of the R14 takes (a refused take counts
    /// nothing, for R15 either).
    Counted(super::TakeOutcome),
    /// The account was already locked: nothing was counted.
    Locked(SendLock),
    /// This count made the pattern abnormal: the account is now locked (with
    /// `Watch::lock`; else it only would be and nothing was stored about it).
    Tripped(SendLock),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-04 22:00:00 UTC
    const H: Timestamp = 1_796_421_600;

    #[test]
    fn the_baseline_folds_finished_hours_and_decays_over_idle_ones() {
        let w = Watch {
            baseline_hours: 10,
            ..Watch::DEFAULT
        };
        let mut s = WatchState::default();
        for _ in 0..20 {
            s.count_accepted(&w, true, H + 5);
        }
        assert_eq!((s.hour, s.messages, s.baseline_milli), (H, 20, 0));
        // Next hour: 20 messages folded in with weight 1/10.
        s.count_accepted(&w, true, H + 3600);
        assert_eq!((s.messages, s.baseline_milli), (1, 2000));
        // Two hours later: the hour with 1 message is folded (2000 + (1000-2000)/10 = 1900),
        // then one idle hour decays it by a tenth (1900 - 190 = 1710).
        s.count_accepted(&w, true, H + 3 * 3600);
        assert_eq!((s.messages, s.baseline_milli), (1, 1710));
        // Far later: nothing is left.
        s.count_accepted(&w, true, H + 1000 * 3600);
        assert_eq!(s.baseline_milli, 0);
    }

    #[test]
    fn a_burst_is_above_both_the_floor_and_factor_times_the_baseline() {
        let w = Watch {
            burst_factor: 10,
            burst_floor: 5,
            ..Watch::DEFAULT
        };
        let mut s = WatchState::default();
        let trips: Vec<bool> = (0..6)
            .map(|_| s.count_accepted(&w, true, H).is_some())
            .collect();
        assert_eq!(trips, [false, false, false, false, false, true]);
        // With a usual 2 messages an hour the threshold is 20, not the floor.
        let mut s = WatchState {
            hour: H,
            baseline_milli: 2000,
            ..WatchState::default()
        };
        for _ in 0..20 {
            assert_eq!(s.count_accepted(&w, true, H), None);
        }
        assert_eq!(
            s.count_accepted(&w, true, H),
            Some(LockCause::Burst {
                messages: 21,
                baseline_milli: 2000,
                threshold: 20
            })
        );
        // Further recipients of a message are not messages.
        let before = s.messages;
        assert_eq!(s.count_accepted(&w, false, H), None);
        assert_eq!(s.messages, before);
    }

    #[test]
    fn refused_recipients_lock_past_the_share_once_there_are_enough() {
        let w = Watch {
            reject_share: 50,
            reject_min: 3,
            ..Watch::DEFAULT
        };
        let mut s = WatchState::default();
        for _ in 0..2 {
            s.count_accepted(&w, true, H);
        }
        assert_eq!(s.count_rejected(&w, H), None, "1 of 3: too few");
        assert_eq!(
            s.count_rejected(&w, H),
            None,
            "2 of 4: still below the minimum"
        );
        assert_eq!(
            s.count_rejected(&w, H),
            Some(LockCause::Rejections {
                rejected: 3,
                total: 5
            })
        );
        // A new hour starts from zero.
        assert_eq!(s.count_rejected(&w, H + 3600), None);
        assert_eq!((s.accepted, s.rejected), (0, 1));
        // Mostly accepted: no lock even with many refusals.
        let mut s = WatchState::default();
        for _ in 0..10 {
            s.count_accepted(&w, false, H);
        }
        for _ in 0..9 {
            assert_eq!(s.count_rejected(&w, H), None);
        }
        assert!(s.count_rejected(&w, H).is_some(), "10 of 20 is 50%");
    }

    #[test]
    fn locks_say_why_with_their_figures() {
        let burst = LockCause::Burst {
            messages: 61,
            baseline_milli: 1_250,
            threshold: 60,
        };
        assert_eq!(
            burst.to_string(),
            "sending burst: 61 messages in one hour, usual 1.250 per hour, threshold 60"
        );
        let lock = SendLock {
            at: H,
            by: AUTOMATIC.into(),
            cause: burst,
        };
        let json = serde_json::to_value(&lock).unwrap();
        assert_eq!(json["cause"], "burst");
        assert_eq!(json["messages"], 61);
        assert_eq!(serde_json::from_value::<SendLock>(json).unwrap(), lock);
    }
}
