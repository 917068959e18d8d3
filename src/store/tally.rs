//! The embedded store's sending counters (R14) and sending patterns (R15), counted in memory
//! and written to the SQLite file in the background.
//!
//! Every accepted recipient of a local sender changes its counters. As one SQLite write
//! transaction per RCPT (the lock, the WAL frames, a hop to a blocking thread and back) that
//! was most of the daemon's CPU per message. Here a check is a few integer operations under a
//! mutex; what changed is written every [`FLUSH_INTERVAL`] in one transaction, at shutdown
//! ([`super::Store::flush`]) and when the last handle on the file is dropped.
//!
//! What that changes, and what it does not:
//! - **Exact within the process.** Every check and its increment are one step under one
//!   mutex: racing RCPTs never pass a limit. Two stores opened on the same file in one process
//!   share one tally (see [`for_path`]).
//! - **Locks are written at once.** A lock made by R15 is in the file before the refusal that
//!   announces it is returned; an administrator's lock or release and a counter reset go to
//!   the file first and to memory in the same step.
//! - **A crash loses at most the last interval's counts** (`kill -9`, OOM killer: up to
//!   [`FLUSH_INTERVAL`] of increments), so a sender may get that many more past a limit once
//!   after a crash. A stop or restart (SIGTERM, SIGHUP reload) loses nothing.
//! - **Several processes on one file** (not a supported deployment: daemons share a store
//!   through Redis) stay approximately right: counters are written as increments and the
//!   file's total read back, so each process sees the others' counts within an interval;
//!   sending patterns are last-writer-wins.

use super::{
    Counter, CounterValue, JointTakeOutcome, SendLock, Take, TakeOutcome, Timestamp, Watch,
    WatchOutcome, WatchState, watch,
};
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, OnceLock, Weak},
    time::Duration,
};

/// How often changed counters and patterns are written to the file.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// One counter of one key: `base` is the file's total when last read or written, `unflushed`
/// what this process added since; both in the window starting at `window`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slot {
    pub window: Timestamp,
    pub base: u64,
    pub unflushed: u64,
}

impl Slot {
    fn count(&self, counter: Counter, now: Timestamp) -> u64 {
        if self.window == counter.window.start(now) {
            self.base.saturating_add(self.unflushed)
        } else {
            0
        }
    }

    fn add(&mut self, counter: Counter, n: u64, now: Timestamp) {
        let start = counter.window.start(now);
        if self.window != start {
            // A new window (or a clock set back): what was counted before does not count.
            *self = Slot {
                window: start,
                ..Slot::default()
            };
        }
        self.unflushed = self.unflushed.saturating_add(n);
    }
}

/// What the tally holds for one key (an account's address, or an organisation's counter
/// key): its counters in [`Counter::ALL`] order, its sending pattern and lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub counters: [Slot; 4],
    pub watch: WatchState,
    pub lock: Option<SendLock>,
    /// The pattern changed since it was last written.
    pub watch_dirty: bool,
    /// The lock changed since it was last written (a write that failed is retried).
    pub lock_dirty: bool,
}

fn index(counter: Counter) -> usize {
    Counter::ALL
        .iter()
        .position(|c| *c == counter)
        .expect("every counter is in Counter::ALL")
}

impl Entry {
    pub fn values(&self, now: Timestamp) -> Vec<CounterValue> {
        Counter::ALL
            .iter()
            .map(|&counter| CounterValue {
                counter,
                count: self.counters[index(counter)].count(counter, now),
                window_start: counter.window.start(now),
                window_end: counter.window.end(now),
            })
            .collect()
    }

    /// The first take that would pass its limit, if any.
    fn check(&self, takes: &[Take], now: Timestamp) -> Option<TakeOutcome> {
        takes.iter().find_map(|t| {
            let count = self.counters[index(t.counter)].count(t.counter, now);
            let limit = t.limit?;
            (count.saturating_add(t.n) > limit).then_some(TakeOutcome::Refused {
                counter: t.counter,
                count,
                limit,
            })
        })
    }

    fn apply(&mut self, takes: &[Take], now: Timestamp) {
        for t in takes {
            self.counters[index(t.counter)].add(t.counter, t.n, now);
        }
    }

    fn is_dirty(&self) -> bool {
        self.watch_dirty || self.lock_dirty || self.counters.iter().any(|s| s.unflushed > 0)
    }
}

/// What a flush writes for one key; taken out of the tally by [`Tally::begin_flush`] and
/// settled by [`Tally::end_flush`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub key: String,
    /// `(counter, window start, increment)` for each counter with something unwritten.
    pub increments: Vec<(Counter, Timestamp, u64)>,
    pub watch: Option<WatchState>,
    /// `Some(lock)` when the lock changed (`Some(None)`: released).
    pub lock: Option<Option<SendLock>>,
}

/// The in-memory counters and patterns of one database (see the module documentation).
#[derive(Debug, Default)]
pub struct Tally {
    entries: Mutex<HashMap<String, Entry>>,
    /// Held exclusively by a flush and by an administrator's change of counters or locks
    /// (written to the file and to memory in one step), shared by loads from the file.
    pub gate: tokio::sync::RwLock<()>,
}

/// The tallies of the database files open in this process, by canonical path: every store
/// opened on one file counts in one tally.
pub fn for_path(path: &std::path::Path) -> Arc<Tally> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Weak<Tally>>>> = OnceLock::new();
    let key = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    open.retain(|_, t| t.strong_count() > 0);
    if let Some(t) = open.get(&key).and_then(Weak::upgrade) {
        return t;
    }
    let t = Arc::new(Tally::default());
    open.insert(key, Arc::downgrade(&t));
    t
}

impl Tally {
    fn entries(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_loaded(&self, key: &str) -> bool {
        self.entries().contains_key(key)
    }

    /// Adds `key` as read from the file, unless it is already there (a racing load).
    pub fn insert_loaded(&self, key: &str, entry: Entry) {
        self.entries().entry(key.to_owned()).or_insert(entry);
    }

    /// Runs `f` on `key`'s entry, if loaded.
    pub fn with<T>(&self, key: &str, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        self.entries().get_mut(key).map(f)
    }

    /// [`super::Store::take`] on a loaded key.
    pub fn take(&self, key: &str, takes: &[Take], now: Timestamp) -> Option<TakeOutcome> {
        self.with(key, |e| {
            if let Some(refused) = e.check(takes, now) {
                return refused;
            }
            e.apply(takes, now);
            TakeOutcome::Taken
        })
    }

    /// [`super::Store::take_with_org`] on two loaded keys.
    pub fn take_with_org(
        &self,
        key: &str,
        takes: &[Take],
        org: &str,
        org_takes: &[Take],
        now: Timestamp,
    ) -> Option<JointTakeOutcome> {
        let mut entries = self.entries();
        if let Some(outcome) = entries.get(key)?.check(takes, now) {
            return Some(JointTakeOutcome {
                outcome,
                by_org: false,
            });
        }
        if let Some(outcome) = entries.get(org)?.check(org_takes, now) {
            return Some(JointTakeOutcome {
                outcome,
                by_org: true,
            });
        }
        entries.get_mut(key)?.apply(takes, now);
        entries.get_mut(org)?.apply(org_takes, now);
        Some(JointTakeOutcome {
            outcome: TakeOutcome::Taken,
            by_org: false,
        })
    }

    /// [`super::Store::take_watched`] on a loaded key. A lock it makes (with `watch.lock`)
    /// is in memory at once and marked unwritten: the caller writes it before answering.
    pub fn take_watched(
        &self,
        key: &str,
        takes: &[Take],
        w: &Watch,
        message: bool,
        now: Timestamp,
    ) -> Option<WatchOutcome> {
        self.with(key, |e| {
            if let Some(lock) = &e.lock {
                return WatchOutcome::Locked(lock.clone());
            }
            if let Some(refused) = e.check(takes, now) {
                return WatchOutcome::Counted(refused);
            }
            e.apply(takes, now);
            let trip = e.watch.count_accepted(w, message, now);
            e.watch_dirty = true;
            finish(e, trip, w, now)
        })
    }

    /// [`super::Store::count_rejected`] on a loaded key (locks as in [`Tally::take_watched`]).
    pub fn count_rejected(&self, key: &str, w: &Watch, now: Timestamp) -> Option<WatchOutcome> {
        self.with(key, |e| {
            if let Some(lock) = &e.lock {
                return WatchOutcome::Locked(lock.clone());
            }
            let trip = e.watch.count_rejected(w, now);
            e.watch_dirty = true;
            finish(e, trip, w, now)
        })
    }

    /// Takes out everything unwritten; the counters' increments move into their `base`
    /// (the process's view does not change) until [`Tally::end_flush`] settles them.
    pub fn begin_flush(&self) -> Vec<Pending> {
        let mut entries = self.entries();
        let mut out = Vec::new();
        for (key, e) in entries.iter_mut().filter(|(_, e)| e.is_dirty()) {
            let mut p = Pending {
                key: key.clone(),
                increments: Vec::new(),
                watch: None,
                lock: None,
            };
            for (&counter, slot) in Counter::ALL.iter().zip(e.counters.iter_mut()) {
                if slot.unflushed > 0 {
                    p.increments.push((counter, slot.window, slot.unflushed));
                    slot.base = slot.base.saturating_add(slot.unflushed);
                    slot.unflushed = 0;
                }
            }
            if std::mem::take(&mut e.watch_dirty) {
                p.watch = Some(e.watch);
            }
            if std::mem::take(&mut e.lock_dirty) {
                p.lock = Some(e.lock.clone());
            }
            out.push(p);
        }
        out
    }

    /// Settles a flush: `totals` are the file's totals after the write, per pending key and
    /// increment (`None`: the write failed, and what it carried is unwritten again).
    pub fn end_flush(&self, pending: Vec<Pending>, totals: Option<Vec<Vec<u64>>>) {
        let mut entries = self.entries();
        let mut totals = totals.map(Vec::into_iter);
        for p in pending {
            let written = totals.as_mut().and_then(Iterator::next);
            let Some(e) = entries.get_mut(&p.key) else {
                continue;
            };
            for (i, &(counter, window, n)) in p.increments.iter().enumerate() {
                let slot = &mut e.counters[index(counter)];
                if slot.window != window {
                    continue; // a new window since: the old one no longer counts
                }
                match written.as_ref().and_then(|w| w.get(i)) {
                    // The file's total holds ours and any other process's.
                    Some(&total) => slot.base = total,
                    None => {
                        slot.base = slot.base.saturating_sub(n);
                        slot.unflushed = slot.unflushed.saturating_add(n);
                    }
                }
            }
            if written.is_none() {
                e.watch_dirty |= p.watch.is_some();
                e.lock_dirty |= p.lock.is_some();
            }
        }
    }

    /// Forgets keys with nothing unwritten whose counters and pattern are of windows
    /// before `now`'s day and hour (they would read as 0, or reload the same from the file)
    /// and that hold no lock: the tally stays the size of the recently active senders.
    pub fn evict_idle(&self, now: Timestamp) {
        let day = Counter::ALL
            .iter()
            .map(|c| c.window.start(now))
            .min()
            .unwrap_or(now);
        self.entries().retain(|_, e| {
            e.is_dirty()
                || e.lock.is_some()
                || e.counters.iter().any(|s| s.window >= day)
                || e.watch.hour >= day
                || e.watch.rej_hour >= day
        });
    }
}

/// The end of a pattern count: for a trip, the lock (in memory, marked unwritten).
fn finish(
    e: &mut Entry,
    trip: Option<super::LockCause>,
    w: &Watch,
    now: Timestamp,
) -> WatchOutcome {
    match trip {
        None => WatchOutcome::Counted(TakeOutcome::Taken),
        Some(cause) => {
            let lock = SendLock {
                at: now,
                by: watch::AUTOMATIC.into(),
                cause,
            };
            if w.lock {
                e.lock = Some(lock.clone());
                e.lock_dirty = true;
            }
            WatchOutcome::Tripped(lock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::counters::{Measure, Window};

    /// 2026-12-04 22:28:01 UTC
    const NOW: Timestamp = 1_796_423_281;
    const MSG_HOUR: Counter = Counter::new(Measure::Messages, Window::Hour);
    const RCPT_DAY: Counter = Counter::new(Measure::Recipients, Window::Day);

    fn take(counter: Counter, n: u64, limit: Option<u64>) -> Take {
        Take { counter, n, limit }
    }

    fn loaded(keys: &[&str]) -> Tally {
        let t = Tally::default();
        for k in keys {
            t.insert_loaded(k, Entry::default());
        }
        t
    }

    fn count(t: &Tally, key: &str, counter: Counter, now: Timestamp) -> u64 {
        t.with(key, |e| e.counters[index(counter)].count(counter, now))
            .unwrap()
    }

    #[test]
    fn takes_stop_at_the_limit_and_a_refusal_changes_nothing() {
        let t = loaded(&["a"]);
        let takes = [take(MSG_HOUR, 1, Some(2)), take(RCPT_DAY, 3, None)];
        assert_eq!(t.take("a", &takes, NOW), Some(TakeOutcome::Taken));
        assert_eq!(t.take("a", &takes, NOW), Some(TakeOutcome::Taken));
        assert_eq!(
            t.take("a", &takes, NOW),
            Some(TakeOutcome::Refused {
                counter: MSG_HOUR,
                count: 2,
                limit: 2
            })
        );
        assert_eq!(count(&t, "a", RCPT_DAY, NOW), 6);
        // The next hour starts from 0; the day goes on.
        assert_eq!(t.take("a", &takes, NOW + 3600), Some(TakeOutcome::Taken));
        assert_eq!(count(&t, "a", MSG_HOUR, NOW + 3600), 1);
        assert_eq!(count(&t, "a", RCPT_DAY, NOW + 3600), 9);
        // A key never loaded is the caller's to load first.
        assert_eq!(t.take("b", &takes, NOW), None);
    }

    #[test]
    fn a_flush_settles_on_the_files_total_and_a_failed_one_is_retried() {
        let t = loaded(&["a"]);
        t.take("a", &[take(MSG_HOUR, 2, None)], NOW).unwrap();
        let pending = t.begin_flush();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            pending[0].increments,
            [(MSG_HOUR, MSG_HOUR.window.start(NOW), 2)]
        );
        // Counted while the write is under way: not in this flush, not lost.
        t.take("a", &[take(MSG_HOUR, 1, None)], NOW).unwrap();
        assert_eq!(count(&t, "a", MSG_HOUR, NOW), 3);
        // Another process had added 5: the file says 7.
        t.end_flush(pending, Some(vec![vec![7]]));
        assert_eq!(count(&t, "a", MSG_HOUR, NOW), 8);

        let pending = t.begin_flush();
        assert_eq!(pending[0].increments[0].2, 1);
        t.end_flush(pending, None);
        assert_eq!(count(&t, "a", MSG_HOUR, NOW), 8);
        let pending = t.begin_flush();
        assert_eq!(pending[0].increments[0].2, 1, "the failed increment again");
        t.end_flush(pending, Some(vec![vec![8]]));
        assert!(t.begin_flush().is_empty(), "nothing left unwritten");
    }

    #[test]
    fn joint_takes_are_all_or_nothing() {
        let t = loaded(&["a", "org"]);
        let mine = [take(MSG_HOUR, 1, Some(10))];
        let org = [take(MSG_HOUR, 1, Some(1))];
        assert_eq!(
            t.take_with_org("a", &mine, "org", &org, NOW)
                .unwrap()
                .outcome,
            TakeOutcome::Taken
        );
        let refused = t.take_with_org("a", &mine, "org", &org, NOW).unwrap();
        assert!(refused.by_org);
        assert_eq!(
            count(&t, "a", MSG_HOUR, NOW),
            1,
            "the account's take undone"
        );
    }

    #[test]
    fn a_trip_locks_in_memory_and_is_marked_for_writing() {
        let t = loaded(&["a"]);
        let w = Watch {
            burst_floor: 2,
            ..Watch::DEFAULT
        };
        for _ in 0..2 {
            assert_eq!(
                t.take_watched("a", &[], &w, true, NOW),
                Some(WatchOutcome::Counted(TakeOutcome::Taken))
            );
        }
        let Some(WatchOutcome::Tripped(lock)) = t.take_watched("a", &[], &w, true, NOW) else {
            panic!("the third message is a burst");
        };
        assert!(matches!(
            t.take_watched("a", &[], &w, true, NOW),
            Some(WatchOutcome::Locked(l)) if l == lock
        ));
        let pending = t.begin_flush();
        assert_eq!(pending[0].lock, Some(Some(lock)));
        assert_eq!(pending[0].watch.unwrap().messages, 3);
    }

    #[test]
    fn idle_keys_are_forgotten_busy_and_locked_ones_kept() {
        let t = loaded(&["idle", "busy", "locked"]);
        t.take("idle", &[take(MSG_HOUR, 1, None)], NOW).unwrap();
        t.with("locked", |e| {
            e.lock = Some(SendLock {
                at: NOW,
                by: "admin".into(),
                cause: crate::store::LockCause::Manual {
                    reason: "test".into(),
                },
            })
        });
        let pending = t.begin_flush();
        let totals = pending
            .iter()
            .map(|p| p.increments.iter().map(|i| i.2).collect())
            .collect();
        t.end_flush(pending, Some(totals));
        let tomorrow = NOW + 86_400;
        t.take("busy", &[take(MSG_HOUR, 1, None)], tomorrow)
            .unwrap();
        t.evict_idle(tomorrow);
        assert!(!t.is_loaded("idle"));
        assert!(t.is_loaded("busy") && t.is_loaded("locked"));
    }

    #[test]
    fn stores_on_one_file_share_a_tally() {
        let dir = tempfile::tempdir().unwrap();
        let a = for_path(&dir.path().join("x.db"));
        let b = for_path(&dir.path().join("x.db"));
        let c = for_path(&dir.path().join("y.db"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
