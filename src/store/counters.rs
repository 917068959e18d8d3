//! Per-account sending counters (R14): what the store counts and how windows are cut.
//!
//! # Fixed windows, aligned to the UTC hour and day
//!
//! A counter counts within one fixed window: the current UTC hour (`12:00:00`–`12:59:59`)
//! or the current UTC day. Fixed windows were chosen over sliding ones because they are
//! exact to count and to explain: a counter is one integer per account and window, every
//! instance sharing the store increments the same integer, and "retry after 13:00 UTC" is a
//! true statement. A sliding approximation (two buckets weighted by the elapsed share)
//! would smooth bursts at the boundary, but its verdict depends on the instant each
//! instance reads the clock and it cannot say exactly when sending is possible again. The
//! price of fixed windows: an account may send up to twice an hourly limit across the top
//! of an hour (the end of one window and the start of the next); the daily limit still
//! bounds the total, which is what Art. 20.3/20.5 aim at (no mass mailing without
//! permission).
//!
//! # Atomicity
//!
//! [`super::Store::take`] checks every requested counter and increments all of them only
//! when none would pass its limit, in one atomic step (one SQLite write transaction; one
//! Lua script on Redis, whose keys share the account's hash tag). So two daemons racing for
//! the last unit of a limit never both get it, and a refused check changes nothing.
//!
//! # Organisation counters
//!
//! With per-organisation limits configured (`[rules.R14] org_messages_per_hour`, ...), the
//! same counters are kept per organisation code, and [`super::Store::take_with_org`] takes
//! the account's and the organisation's together: all or nothing. On SQLite and on Redis
//! standalone/Sentinel that is one transaction / one script. On Redis Cluster the
//! organisation's keys live in their own slot, so it is two scripts: the account's take,
//! then the organisation's; when the organisation refuses, the account's take is given back
//! (see the Redis store's module docs). Without organisation limits nothing is counted per
//! organisation and a check costs what it did before.

use super::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A fixed counting window, aligned to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    Hour,
    Day,
}

impl Window {
    pub fn seconds(self) -> i64 {
        match self {
            Window::Hour => 3600,
            Window::Day => 86_400,
        }
    }

    /// Start of the window containing `now`.
    pub fn start(self, now: Timestamp) -> Timestamp {
        now - now.rem_euclid(self.seconds())
    }

    /// First second after the window containing `now`: when its counters start again at 0.
    pub fn end(self, now: Timestamp) -> Timestamp {
        self.start(now) + self.seconds()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Hour => "hour",
            Window::Day => "day",
        }
    }
}

/// What a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    /// Messages (counted once, at a message's first accepted recipient).
    Messages,
    /// Accepted recipients.
    Recipients,
}

impl Measure {
    pub fn as_str(self) -> &'static str {
        match self {
            Measure::Messages => "messages",
            Measure::Recipients => "recipients",
        }
    }
}

/// One per-account counter: a measure in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Counter {
    pub measure: Measure,
    pub window: Window,
}

impl Counter {
    pub const fn new(measure: Measure, window: Window) -> Counter {
        Counter { measure, window }
    }

    /// Every counter an account has, in the order [`super::Store::counters`] returns them.
    pub const ALL: [Counter; 4] = [
        Counter::new(Measure::Messages, Window::Hour),
        Counter::new(Measure::Messages, Window::Day),
        Counter::new(Measure::Recipients, Window::Hour),
        Counter::new(Measure::Recipients, Window::Day),
    ];

    /// `messages:hour`: the name in stored keys and rows.
    pub fn name(self) -> String {
        format!("{}:{}", self.measure.as_str(), self.window.as_str())
    }
}

impl fmt::Display for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {}", self.measure.as_str(), self.window.as_str())
    }
}

/// One part of a [`super::Store::take`]: add `n` to `counter` unless that makes it pass
/// `limit` (`None`: no limit, only count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    pub counter: Counter,
    pub n: u64,
    pub limit: Option<u64>,
}

/// The answer of [`super::Store::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOutcome {
    /// Every counter was incremented.
    Taken,
    /// Nothing was incremented: `counter` holds `count` and adding its `n` would pass its
    /// `limit`. It is the first such counter in the order the takes were given.
    Refused {
        counter: Counter,
        count: u64,
        limit: u64,
    },
}

/// The answer of [`super::Store::take_with_org`]: the joint outcome, and whose counter
/// refused (`by_org`: the organisation's; else the account's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JointTakeOutcome {
    pub outcome: TakeOutcome,
    pub by_org: bool,
}

/// A counter's value in the window containing the time asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterValue {
    pub counter: Counter,
    pub count: u64,
    pub window_start: Timestamp,
    pub window_end: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_to_utc_hours_and_days() {
        // 2026-12-04 22:28:01 UTC
        let now = 1_796_423_281;
        assert_eq!(Window::Hour.start(now), 1_796_421_600); // 22:00:00
        assert_eq!(Window::Hour.end(now), 1_796_425_200); // 23:00:00
        assert_eq!(Window::Day.start(now), 1_796_342_400); // 00:00:00
        assert_eq!(Window::Day.end(now), 1_796_428_800);
        assert_eq!(Window::Hour.start(1_796_421_600), 1_796_421_600);
        assert_eq!(Window::Hour.end(1_796_425_199), 1_796_425_200);
    }
}
