//! The Redis store: `redis://`, `rediss://`, `redis+sentinel://`, `redis+cluster://`.
//!
//! Several mailwarden instances (one per MTA) share one Redis deployment and see the same
//! directory. The URL syntax (hosts, database, passwords, options) is documented in
//! [`url`]; in short:
//!
//! ```text
//! redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?prefix=mw&timeout=2s]
//! rediss://[[USER]:PASSWORD@]HOST[:PORT][/DB][?ca=/etc/mailwarden/redis-ca.pem]
//! redis+sentinel://[[USER]:PASSWORD@]S1[:26379],S2[:26379],.../SERVICE[/DB][?sentinel_password=..]
//! redis+cluster://[[USER]:PASSWORD@]N1[:6379],N2[:6379],...
//! ```
//!
//! # Key layout
//!
//! Every directory key carries the one hash tag `{dir}`, so on Cluster the whole directory
//! lives in one slot and every multi-key script runs on one node, atomically. The directory
//! is small (organisations and accounts, not traffic); per-account counters of later
//! versions use their own per-account tags and spread over the cluster. `P` is the URL's
//! `prefix` (default `mw`):
//!
//! | key | type | content |
//! |---|---|---|
//! | `P:{dir}:org:<code>` | hash | one organisation (field `relays`: R10's networks, space-separated; `default_quota_bytes`: R13's default; each absent when none) |
//! | `P:{dir}:dom:<domain>` | string | the code of the organisation owning `<domain>` |
//! | `P:{dir}:orgs` | sorted set | every code, score 0 (so ordered by code, bytewise) |
//! | `P:{dir}:acct:<address>` | hash | one account |
//! | `P:{dir}:accts` | sorted set | every address, score 0 |
//! | `P:{dir}:org-accts:<code>` | sorted set | the addresses of one organisation, score 0 |
//! | `P:{dir}:delegates:<address>` | sorted set | R8: the accounts that may send as this mailbox, score 0 |
//! | `P:{dir}:delegated:<address>` | sorted set | R8: the mailboxes this account may send as (the reverse index), score 0 |
//!
//! Sending counters (R14, see [`super::counters`]) are outside the directory, one hash tag
//! per account so that each account's counters share one slot:
//!
//! | key | type | content |
//! |---|---|---|
//! | `P:{acct:<address>}:rate:<measure>:<window>:<start>` | string | a count, e.g. `mw:{acct:champa@mpt.gov.la}:rate:messages:hour:1796421600` |
//!
//! | `P:{org:<code>}:rate:<measure>:<window>:<start>` | string | an organisation's count (R14's `org_*` limits; only the limited counters are kept) |
//!
//! `<start>` is the window's start (Unix seconds); a key expires one window after its
//! window ends, so old windows clean themselves up. The mailbox usage (R13) is
//! `P.usage.<address>/quota/storage`, a decimal byte count: a report of the mailbox server
//! SETs it (the last report wins), a delivery counted by mailwarden INCRBYs it (atomic, so
//! instances counting at once lose nothing; a missing key counts from 0). That is the key
//! Dovecot's `quota_clone` plugin writes with `quota_clone_dict =
//! redis:...:prefix=P.usage.` (its redis dict stores the private key `priv/quota/storage` of
//! user U as `<prefix>U/quota/storage`), so Dovecot can report usage straight into the store;
//! it is read with a single GET, so it needs no hash tag. Dots, not colons, after `P`:
//! Dovecot splits its dict settings at every `:`, so its `prefix=` can hold none (a prefix
//! `P:usage:` fails there with "dict redis: Unknown parameter"; `tests/dovecot.rs` runs the
//! real Dovecot).
//! The countries an account logged in from (R16) are the hash `P:{acct:<address>}:countries`,
//! country code -> first seen (Unix seconds); one script reads the known ones and adds the
//! new one (HKEYS + HSETNX), so only one of several racing instances sees a country as new.
//!
//! Names in keys are the normalised (lower-case) forms, which gives case-insensitive
//! uniqueness (R4). Sorted sets with equal scores are ordered bytewise, which is the order
//! the contract pins for lists (`code`; `local@domain`).
//!
//! # Record encoding
//!
//! Records are hashes with one field per attribute, values as text: enums by their names
//! (`active`, `person`, ...), times as decimal Unix seconds, `quota_bytes` as a decimal.
//! An absent optional attribute is an absent field. Field `v` is the encoding version
//! (`1`). A record with another version, a missing required field, or an unknown enum value
//! reads as [`StoreError::Corrupt`] and is never overwritten: the status-change script checks
//! the version and the current status before writing. Hash fields (rather than a JSON blob)
//! let a script change a status without decoding or re-encoding anything, so no number is
//! ever rounded by Lua.
//!
//! # Scripts
//!
//! Every read-modify-write is one Lua script ([`::redis::Script`]: EVALSHA, with SCRIPT LOAD
//! and a retry on NOSCRIPT, also after a failover to a node that never saw the script). The
//! scripts declare every key they touch; all are in the `{dir}` slot:
//!
//! - `create_org`: refuses when the code or the domain is taken, else writes the record, the
//!   domain pointer and the index entry.
//! - `create_accounts` (also used for one account): first validates every account (its
//!   organisation exists, else `NotFound`; its address is neither registered nor repeated in
//!   the batch, else `Conflict`), then writes them all. Redis runs a script to completion
//!   without interleaving other commands, so this is all-or-nothing, also against a racing
//!   registrar on another daemon.
//! - `set_status`: checks the record exists, has this version and a known status, returns
//!   the record before and after changing status, reason and time.
//! - `take` (R14): reads every requested counter of one account, and increments all of them
//!   (INCRBY + EXPIRE) only if none would pass its limit: one round trip per check. It is
//!   not retried after a broken connection: it may have run, and a tempfailed recipient
//!   that was counted anyway errs on the safe side (never a count lost, at worst one
//!   recipient counted that the client will send again).
//! - `take` with organisation limits ([`Store::take_with_org`]): on standalone and Sentinel,
//!   one `take` script over the account's and the organisation's keys (one round trip, all
//!   or nothing). On Cluster the organisation's keys are in their own slot `{org:<code>}`,
//!   which a script cannot combine with the account's; so the account's `take` runs first
//!   (refused: nothing changed), then the organisation's; when that refuses or fails,
//!   `give_back` DECRBYs the account's counters again. Two round trips per check, only when
//!   organisation limits are configured (three on an organisation refusal). Between the two
//!   the account's counters are briefly one higher: a racing check of that account may
//!   refuse early, none can pass a limit. A failed give-back leaves the account counted one
//!   too many until the window ends (the safe side, logged).
//! - `set_field`: like `set_status`, for one field: an account's bulk permission (`bulk`,
//!   `1` or absent) and quota (`quota_bytes`, absent for none), an organisation's default
//!   quota (`default_quota_bytes`), each announced like any change of that record.
//! - `delegate` (R8): checks that the mailbox (and, when adding, the delegate) account
//!   exists, then adds or removes the pair in both sorted sets together; the answer says
//!   whether anything changed.
//! - `get_org_by_domain`, `taken_locals`: read-only (`flags=no-writes`) scripts, one round
//!   trip and one consistent view each.
//!
//! Every write script also PUBLISHes what it changed on the channel `P:{dir}:changes`
//! (`org:<code>`, `acct:<address>`, or `all` for an import of more than 100 accounts), in the
//! same atomic step as the write.
//!
//! Lists read the index (ZRANGE), then the records in pipelined batches of [`LIST_BATCH`].
//! Records are never deleted, so a list is consistent without a snapshot.
//!
//! # Connections, timeouts, failover
//!
//! - Standalone (`redis://`, `rediss://`): one [`ConnectionManager`], a multiplexed connection
//!   shared by all tasks that reconnects by itself after a failure.
//! - Cluster: the cluster client's multiplexed connections; it follows MOVED/ASK and refreshes
//!   the slot map.
//! - Sentinel: the primary is resolved through the sentinels and verified (it must report
//!   the master role), then used over one multiplexed connection. A connection error, a
//!   timeout or a `READONLY` reply (the node was demoted) drops that connection; the next
//!   call asks the sentinels again. So the store follows a failover without a restart, and
//!   it only ever writes to the node the sentinels name as primary.
//!
//! Every round trip (including connecting and the sentinel lookup) is bounded by the URL's
//! `timeout` (default 2 s); any failure is [`StoreError::Unavailable`], which the mail path
//! turns into a tempfail. A read is retried once after a connection error; a write only after
//! `READONLY` (which proves it was not executed): a write whose connection broke may or may
//! not have been applied, and retrying a registration could turn its own success into a
//! `Conflict`.
//!
//! # Change feed (cache invalidation across daemons)
//!
//! The mail path caches lookups; a change made through another daemon's admin API would
//! otherwise show only after `store.cache_ttl`. [`Store::changes`] starts (once per store) a
//! task that SUBSCRIBEs to the change channel on its own connection (standalone: the server;
//! Sentinel: the current primary; Cluster: the first node that answers, as Redis broadcasts
//! PUBLISH to every node) and forwards each announcement; the daemon drops the affected
//! cache entries. The subscription is checked with a PING every [`FEED_PING`]; whenever it
//! breaks, the task subscribes again with backoff and then announces
//! [`DirectoryChange::All`], because announcements made in between are lost (pub/sub keeps
//! nothing). The TTL still bounds staleness while the feed is down.
//!
//! # Durability
//!
//! What survives a Redis crash is the server's persistence setting (use `appendonly yes`,
//! `appendfsync everysec`: at most about a second of writes lost). Replication is
//! asynchronous: when the primary dies, a write it acknowledged in its last moments may not
//! have reached the replica that gets promoted, and is lost (Sentinel and Cluster alike).
//! Directory writes are audited admin actions and can be redone; `min-replicas-to-write 1`
//! on the servers narrows the window further.

pub mod url;

pub use url::{Node, RedisUrl, Secret, Topology, redact};

use super::*;
use crate::model::Address;
use ::redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisConnectionInfo, RedisError, RedisResult, Script, ScriptInvocation, ServerErrorKind,
    TlsCertificates, Value,
    aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};
use futures_util::StreamExt;
use std::{
    collections::HashMap,
    fmt::Display,
    str::FromStr,
    sync::{
        LazyLock, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::sync::broadcast;
use tokio_util::task::AbortOnDropHandle;

/// Records fetched per pipelined round trip when listing.
pub const LIST_BATCH: usize = 500;

/// The record encoding version written in field `v`.
const VERSION: &str = "1";

pub struct RedisStore {
    backend: Backend,
    keys: Keys,
    timeout: Duration,
    url: RedisUrl,
    /// The change feed, started by the first [`Store::changes`] call.
    feed: OnceLock<Feed>,
    /// Round trips, failures and latency for `/metrics`.
    stats: StoreStats,
}

/// The subscriber task (stopped when the store drops) and the channel it feeds.
struct Feed {
    tx: broadcast::Sender<DirectoryChange>,
    _task: AbortOnDropHandle<()>,
}

/// Announcements a feed buffers per receiver before it reports a lag (which makes the
/// cache forget everything, so nothing is missed).
const FEED_CAPACITY: usize = 1024;
/// How often the subscriber checks that its connection is alive.
const FEED_PING: Duration = Duration::from_secs(10);

impl RedisStore {
    /// Connects to the deployment named by `url` (any of the Redis schemes) and checks that
    /// it answers. Errors never contain a password.
    pub async fn open(url: &str) -> StoreResult<RedisStore> {
        let parsed = RedisUrl::parse(url).map_err(StoreError::Unavailable)?;
        Self::open_parsed(&parsed).await
    }

    pub async fn open_parsed(url: &RedisUrl) -> StoreResult<RedisStore> {
        let shown = url.redacted();
        let fail = |e: RedisError| StoreError::Unavailable(format!("{shown}: {e}"));
        let timeout = url.timeout;
        let connect = async {
            let backend = match &url.topology {
                Topology::Standalone { node, tls } => {
                    standalone(url, node, *tls).await.map_err(fail)?
                }
                Topology::Cluster { nodes } => cluster(url, nodes).await.map_err(fail)?,
                Topology::Sentinel { sentinels, service } => {
                    sentinel(url, sentinels, service).map_err(fail)?
                }
            };
            Ok::<_, StoreError>(backend)
        };
        let backend = tokio::time::timeout(timeout, connect).await.map_err(|_| {
            StoreError::Unavailable(format!("{shown}: no connection within {timeout:?}"))
        })??;
        let store = RedisStore {
            backend,
            keys: Keys::new(&url.prefix),
            timeout,
            url: url.clone(),
            feed: OnceLock::new(),
            stats: StoreStats::default(),
        };
        store
            .ping()
            .await
            .map_err(|e| StoreError::Unavailable(format!("{shown}: {e}")))?;
        Ok(store)
    }

    /// One round trip (plus at most one retry, see the module docs), bounded by the timeout.
    async fn call(&self, call: Call<'_>, idempotent: bool) -> StoreResult<Value> {
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(
            self.timeout,
            self.backend.run(&call, idempotent, &self.stats),
        )
        .await;
        self.stats.latency.observe(started.elapsed().as_secs_f64());
        if !matches!(result, Ok(Ok(_))) {
            self.stats.failures.inc();
        }
        match result {
            Ok(Ok(v)) => Ok(v),
            // A key holding another type than this version writes there.
            Ok(Err(e)) if e.code() == Some("WRONGTYPE") => {
                Err(StoreError::Corrupt(format!("Redis: {e}")))
            }
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("Redis: {e}"))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "Redis did not answer within {:?}",
                self.timeout
            ))),
        }
    }

    async fn read_hash(&self, key: &str) -> StoreResult<Option<Fields>> {
        let v = self
            .call(Call::Cmd(::redis::cmd("HGETALL").arg(key)), true)
            .await?;
        let fields: Fields = decode(v, key)?;
        Ok((!fields.is_empty()).then_some(fields))
    }

    /// Reads the records listed in the index `index`, in index order.
    async fn read_indexed<T>(
        &self,
        index: &str,
        key: impl Fn(&str) -> String,
        parse: impl Fn(Record) -> StoreResult<T>,
    ) -> StoreResult<Vec<T>> {
        let v = self
            .call(
                Call::Cmd(::redis::cmd("ZRANGE").arg(index).arg(0).arg(-1)),
                true,
            )
            .await?;
        let names: Vec<String> = decode(v, index)?;
        let mut out = Vec::with_capacity(names.len());
        for batch in names.chunks(LIST_BATCH) {
            let mut pipe = ::redis::pipe();
            for name in batch {
                pipe.cmd("HGETALL").arg(key(name));
            }
            let v = self.call(Call::Pipe(&pipe), true).await?;
            let hashes: Vec<Fields> = decode(v, index)?;
            if hashes.len() != batch.len() {
                return Err(StoreError::Corrupt(format!(
                    "{index}: asked for {} records, got {}",
                    batch.len(),
                    hashes.len()
                )));
            }
            for (name, fields) in batch.iter().zip(hashes) {
                let key = key(name);
                if fields.is_empty() {
                    return Err(StoreError::Corrupt(format!(
                        "{index} lists {name} but {key} does not exist"
                    )));
                }
                out.push(parse(Record::new(key, fields))?);
            }
        }
        Ok(out)
    }

    /// Runs the TAKE script over `keyed` (all in one slot, or any keys off Cluster): `None`
    /// when every take was applied, else the (0-based) index of the first refused take and
    /// its counter's count. Not retried: a script whose connection broke may have run (see
    /// the module docs).
    async fn run_takes(
        &self,
        keyed: &[(String, Take)],
        now: Timestamp,
        what: &str,
    ) -> StoreResult<Option<(usize, u64)>> {
        if keyed.is_empty() {
            return Ok(None);
        }
        let mut inv = TAKE.prepare_invoke();
        for (key, t) in keyed {
            let w = t.counter.window;
            // Kept one window past its end: long enough for any instance whose clock lags.
            let ttl = w.end(now) - now + w.seconds();
            inv.key(key)
                .arg(t.n)
                .arg(t.limit.map(|l| l.to_string()).unwrap_or_default())
                .arg(ttl);
        }
        let v = self.call(Call::Script(&inv), false).await?;
        let Value::Array(mut parts) = v else {
            return Err(unexpected(what, &v));
        };
        let tag: String = match parts.first() {
            Some(t) => decode(t.clone(), what)?,
            None => return Err(StoreError::Corrupt(format!("{what}: empty script reply"))),
        };
        match (tag.as_str(), parts.len()) {
            ("ok", 1) => Ok(None),
            ("refused", 3) => {
                let count: u64 = decode(parts.pop().unwrap_or_default(), what)?;
                let index: usize = decode(parts.pop().unwrap_or_default(), what)?;
                match index.checked_sub(1).filter(|&i| i < keyed.len()) {
                    Some(i) => Ok(Some((i, count))),
                    None => Err(StoreError::Corrupt(format!("{what}: refused take {index}"))),
                }
            }
            ("corrupt", 2) => {
                let key: String = decode(parts.pop().unwrap_or_default(), what)?;
                Err(StoreError::Corrupt(format!("{key} does not hold a count")))
            }
            _ => Err(StoreError::Corrupt(format!(
                "{what}: unexpected script reply {tag:?}"
            ))),
        }
    }

    /// Gives back takes applied by [`Self::run_takes`] (Cluster, when the organisation
    /// refused after the account's take). One script in the account's slot.
    async fn give_back(&self, keyed: &[(String, Take)]) -> StoreResult<()> {
        let mut inv = GIVE_BACK.prepare_invoke();
        for (key, t) in keyed {
            inv.key(key).arg(t.n);
        }
        self.call(Call::Script(&inv), false).await?;
        Ok(())
    }

    /// Every counter ([`Counter::ALL`]) named by `key`, in one MGET.
    async fn read_counters(
        &self,
        key: impl Fn(Counter) -> String,
        now: Timestamp,
        what: &str,
    ) -> StoreResult<Vec<CounterValue>> {
        let mut mget = ::redis::cmd("MGET");
        for c in Counter::ALL {
            mget.arg(key(c));
        }
        let v = self.call(Call::Cmd(&mget), true).await?;
        let counts: Vec<Option<String>> = decode(v, what)?;
        if counts.len() != Counter::ALL.len() {
            return Err(StoreError::Corrupt(format!(
                "{what}: asked for {} counters, got {}",
                Counter::ALL.len(),
                counts.len()
            )));
        }
        Counter::ALL
            .into_iter()
            .zip(counts)
            .map(|(counter, count)| {
                let count = match count {
                    None => 0,
                    Some(s) => s.parse::<u64>().map_err(|_| {
                        StoreError::Corrupt(format!("{what}: {counter} holds {s:?}"))
                    })?,
                };
                Ok(CounterValue {
                    counter,
                    count,
                    window_start: counter.window.start(now),
                    window_end: counter.window.end(now),
                })
            })
            .collect()
    }

    /// Sets (`Some`) or removes (`None`) one field of an account record, announcing it.
    async fn set_field(
        &self,
        address: &Address,
        field: &str,
        value: Option<String>,
    ) -> StoreResult<(Account, Account)> {
        let address = address.to_string();
        let key = self.keys.account(&address);
        let (before, after) = self
            .set_record_field(
                ("account", address.clone(), key),
                format!("acct:{address}"),
                field,
                value,
            )
            .await?;
        Ok((before.account()?, after.account()?))
    }

    /// Sets (`Some`) or removes (`None`) one field of the record `key` (an account or an
    /// organisation, `what` `name` in errors), announcing `announce` on the change feed.
    async fn set_record_field(
        &self,
        (what, name, key): (&'static str, String, String),
        announce: String,
        field: &str,
        value: Option<String>,
    ) -> StoreResult<(Record, Record)> {
        let mut inv = SET_FIELD.prepare_invoke();
        inv.key(&key)
            .arg(self.keys.changes())
            .arg(announce)
            .arg(VERSION)
            .arg(field)
            .arg(if value.is_some() { "1" } else { "0" })
            .arg(value.unwrap_or_default());
        let v = self.call(Call::Script(&inv), false).await?;
        record_change(v, (what, name, key))
    }

    /// The keys and arguments of [`WATCH_PRELUDE`].
    fn watch_args(
        &self,
        inv: &mut ScriptInvocation<'static>,
        address: &str,
        w: &Watch,
        message: bool,
        now: Timestamp,
    ) {
        // The pattern lives as long as its baseline can matter (see `store::watch`).
        let ttl = (8 * w.baseline_hours.max(1) + 48) * 3600;
        inv.key(self.keys.lock(address))
            .key(self.keys.watch(address))
            .arg(now)
            .arg(now - now.rem_euclid(3600))
            .arg(if message { "1" } else { "0" })
            .arg(w.burst_factor)
            .arg(w.burst_floor)
            .arg(w.baseline_hours)
            .arg(w.reject_share)
            .arg(w.reject_min)
            .arg(if w.lock { "1" } else { "0" })
            .arg(ttl)
            .arg(watch::AUTOMATIC);
    }

    /// Runs the status-change script on `(what, name, key)` with the statuses `known`;
    /// `announce` is the message for the change feed.
    async fn set_status<S: StatusName>(
        &self,
        (what, name, key): (&'static str, String, String),
        change: &StatusChange<S>,
        known: &[&str],
        announce: String,
    ) -> StoreResult<(Record, Record)> {
        let (status, reason, at) = (change.status.name(), change.reason.as_deref(), change.at);
        let mut inv = SET_STATUS.prepare_invoke();
        inv.key(&key)
            .arg(self.keys.changes())
            .arg(announce)
            .arg(VERSION)
            .arg(status)
            .arg(at)
            .arg(if reason.is_some() { "1" } else { "0" })
            .arg(reason.unwrap_or(""));
        for k in known {
            inv.arg(*k);
        }
        let v = self.call(Call::Script(&inv), false).await?;
        record_change(v, (what, name, key))
    }
}

impl RedisStore {
    /// Adds or removes one delegation (R8) with the `delegate` script.
    async fn delegate(&self, mailbox: &Address, delegate: &Address, op: &str) -> StoreResult<bool> {
        let (mailbox, delegate) = (mailbox.to_string(), delegate.to_string());
        let key = self.keys.delegates(&mailbox);
        let mut inv = DELEGATE.prepare_invoke();
        inv.key(self.keys.account(&mailbox))
            .key(self.keys.account(&delegate))
            .key(&key)
            .key(self.keys.delegated(&delegate))
            .arg(self.keys.changes())
            .arg(&mailbox)
            .arg(&delegate)
            .arg(op);
        let v = self.call(Call::Script(&inv), false).await?;
        let Value::Array(mut parts) = v else {
            return Err(unexpected(&key, &v));
        };
        let tag: String = match parts.first() {
            Some(t) => decode(t.clone(), &key)?,
            None => return Err(StoreError::Corrupt(format!("{key}: empty script reply"))),
        };
        match (tag.as_str(), parts.len()) {
            ("ok", 2) => {
                let changed: i64 = decode(parts.pop().unwrap_or_default(), &key)?;
                Ok(changed == 1)
            }
            ("notfound", 2) => Err(StoreError::NotFound {
                what: "account",
                name: decode(parts.pop().unwrap_or_default(), &key)?,
            }),
            _ => Err(StoreError::Corrupt(format!(
                "{key}: unexpected script reply {tag:?}"
            ))),
        }
    }

    /// The addresses in the sorted set `key`, in order.
    async fn address_set(&self, key: &str) -> StoreResult<Vec<Address>> {
        let v = self
            .call(
                Call::Cmd(::redis::cmd("ZRANGE").arg(key).arg(0).arg(-1)),
                true,
            )
            .await?;
        let names: Vec<String> = decode(v, key)?;
        names
            .iter()
            .map(|n| {
                Address::parse(n).map_err(|e| {
                    StoreError::Corrupt(format!("{key}: {n:?} is not an address: {e}"))
                })
            })
            .collect()
    }
}

/// The keys of one namespace (see the module docs).
struct Keys {
    base: String,
    prefix: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        Keys {
            base: format!("{prefix}:{{dir}}:"),
            prefix: prefix.to_owned(),
        }
    }
    /// A sending counter of `address` (R14) in the window starting at `window_start`. The
    /// hash tag is per account: all counters of one account are in one slot (one script),
    /// different accounts spread over the cluster.
    /// The mailbox usage of `address` in bytes (R13): the key Dovecot's quota_clone writes
    /// (see the module docs for why it has no colon after the prefix).
    fn usage(&self, address: &str) -> String {
        format!("{}.usage.{address}/quota/storage", self.prefix)
    }
    /// The countries `address` logged in from (R16): a hash country -> first seen (Unix
    /// seconds), in the account's slot.
    fn countries(&self, address: &str) -> String {
        format!("{}:{{acct:{address}}}:countries", self.prefix)
    }
    /// R15: the account's sending lock (JSON), in the account's slot.
    fn lock(&self, address: &str) -> String {
        format!("{}:{{acct:{address}}}:lock", self.prefix)
    }
    /// R15: the account's sending pattern (hash), in the account's slot.
    fn watch(&self, address: &str) -> String {
        format!("{}:{{acct:{address}}}:watch", self.prefix)
    }
    /// R20: last use of every account (hash: address → Unix seconds).
    fn last_use(&self) -> String {
        format!("{}last-use", self.base)
    }
    fn counter(&self, address: &str, counter: Counter, window_start: Timestamp) -> String {
        format!(
            "{}:{{acct:{address}}}:rate:{}:{window_start}",
            self.prefix,
            counter.name()
        )
    }
    /// A sending counter of organisation `code` (R14's organisation limits), in the
    /// organisation's own slot.
    fn org_counter(&self, code: &str, counter: Counter, window_start: Timestamp) -> String {
        format!(
            "{}:{{org:{code}}}:rate:{}:{window_start}",
            self.prefix,
            counter.name()
        )
    }
    fn org(&self, code: &str) -> String {
        format!("{}org:{code}", self.base)
    }
    fn org_prefix(&self) -> String {
        format!("{}org:", self.base)
    }
    fn domain(&self, domain: &str) -> String {
        format!("{}dom:{domain}", self.base)
    }
    fn orgs(&self) -> String {
        format!("{}orgs", self.base)
    }
    fn account(&self, address: &str) -> String {
        format!("{}acct:{address}", self.base)
    }
    fn accounts(&self) -> String {
        format!("{}accts", self.base)
    }
    fn org_accounts(&self, code: &str) -> String {
        format!("{}org-accts:{code}", self.base)
    }
    /// R8: who may send as mailbox `address`.
    fn delegates(&self, address: &str) -> String {
        format!("{}delegates:{address}", self.base)
    }
    /// R8: which mailboxes account `address` may send as.
    fn delegated(&self, address: &str) -> String {
        format!("{}delegated:{address}", self.base)
    }
    /// The pub/sub channel of the change feed (a channel, not a key).
    fn changes(&self) -> String {
        format!("{}changes", self.base)
    }
}

// ---------------------------------------------------------------------------------------
// Scripts

/// KEYS: org record, domain pointer, code index. ARGV: change channel, code, domain,
/// field/value pairs.
static CREATE_ORG: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
if redis.call('EXISTS', KEYS[1]) == 1 then return {'conflict', ARGV[2]} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'conflict', ARGV[3]} end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
redis.call('PUBLISH', ARGV[1], 'org:' .. ARGV[2])
return {'ok'}
"#,
    )
});

/// KEYS: the index of all addresses, then per account: its record, its organisation's
/// record, its organisation's index. ARGV: the change channel, then per account: address,
/// organisation code, the number F of field/value items, then those F items.
/// Announces each new account, or `all` for an import of more than 100.
static CREATE_ACCOUNTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
local n = (#KEYS - 1) / 3
local seen = {}
local writes = {}
local p = 2
for i = 0, n - 1 do
  local address, org, f = ARGV[p], ARGV[p + 1], tonumber(ARGV[p + 2])
  local record, org_record, org_index = KEYS[2 + 3 * i], KEYS[3 + 3 * i], KEYS[4 + 3 * i]
  if redis.call('EXISTS', org_record) == 0 then return {'notfound', org} end
  if seen[address] or redis.call('EXISTS', record) == 1 then return {'conflict', address} end
  seen[address] = true
  writes[#writes + 1] = {record, org_index, address, p + 3, p + 2 + f}
  p = p + 3 + f
end
for _, w in ipairs(writes) do
  redis.call('HSET', w[1], unpack(ARGV, w[4], w[5]))
  redis.call('ZADD', w[2], 0, w[3])
  redis.call('ZADD', KEYS[1], 0, w[3])
end
if n <= 100 then
  for _, w in ipairs(writes) do redis.call('PUBLISH', ARGV[1], 'acct:' .. w[3]) end
else
  redis.call('PUBLISH', ARGV[1], 'all')
end
return {'ok'}
"#,
    )
});

/// KEYS: the record. ARGV: change channel, announcement, encoding version, new status,
/// time, '1' if a reason follows (else '0'), the reason, then every status this version
/// knows.
static SET_STATUS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then return {'notfound'} end
local v = redis.call('HGET', KEYS[1], 'v')
if v ~= ARGV[3] then return {'corrupt', 'record version ' .. tostring(v) .. ' is not ' .. ARGV[3]} end
local status = redis.call('HGET', KEYS[1], 'status')
local known = false
for i = 8, #ARGV do
  if ARGV[i] == status then known = true end
end
if not known then return {'corrupt', 'status ' .. tostring(status) .. ' is not known'} end
local before = redis.call('HGETALL', KEYS[1])
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'status_changed_at', ARGV[5])
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'status_reason', ARGV[7])
else
  redis.call('HDEL', KEYS[1], 'status_reason')
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return {'ok', before, redis.call('HGETALL', KEYS[1])}
"#,
    )
});

/// R10: compare-and-set of an organisation's relay networks. KEYS: the record. ARGV: change
/// channel, announcement, encoding version, the value read before ('' = none), the new value.
/// Returns {'notfound'}, {'changed'} (someone else changed it since: read again) or
/// {'ok', before, after}.
static SET_RELAYS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then return {'notfound'} end
local v = redis.call('HGET', KEYS[1], 'v')
if v ~= ARGV[3] then return {'corrupt', 'record version ' .. tostring(v) .. ' is not ' .. ARGV[3]} end
local current = redis.call('HGET', KEYS[1], 'relays') or ''
if current ~= ARGV[4] then return {'changed'} end
local before = redis.call('HGETALL', KEYS[1])
if ARGV[5] == '' then
  redis.call('HDEL', KEYS[1], 'relays')
else
  redis.call('HSET', KEYS[1], 'relays', ARGV[5])
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return {'ok', before, redis.call('HGETALL', KEYS[1])}
"#,
    )
});

/// Sending limits (R14). KEYS: one counter per take. ARGV: per take, its amount, its limit
/// (empty: none) and the counter's lifetime in seconds. Checks every counter, then
/// increments all or none. Returns {'ok'}, {'refused', index (1-based), count} or
/// {'corrupt', key}.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
for i, key in ipairs(KEYS) do
  local count = tonumber(redis.call('GET', key) or '0')
  if not count then return {'corrupt', key} end
  local limit = tonumber(ARGV[3 * i - 1])
  if limit and count + tonumber(ARGV[3 * i - 2]) > limit then
    return {'refused', i, count}
  end
end
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[3 * i - 2])
  redis.call('EXPIRE', key, ARGV[3 * i])
end
return {'ok'}
"#,
    )
});

/// KEYS: the account's login countries (R16). ARGV: the country, the time.
/// Returns {1 if it was new else 0, countries recorded before}.
static RECORD_COUNTRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
local before = redis.call('HKEYS', KEYS[1])
local added = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return {added, before}
"#,
    )
});

/// R14 on Cluster: gives back an account's take after its organisation refused. KEYS: the
/// counters taken; ARGV: the amounts. A counter that expired meanwhile is left alone.
static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('DECRBY', key, ARGV[i]) end
end
return 'ok'
"#,
    )
});

/// R15's pattern arithmetic, shared by the two scripts below (mirrors `store::watch`).
/// ARGV[1] now, ARGV[2] start of its UTC hour, ARGV[3] '1' when a message is counted,
/// ARGV[4..8] burst_factor, burst_floor, baseline_hours, reject_share, reject_min,
/// ARGV[9] '1' to store a lock, ARGV[10] the pattern's lifetime, ARGV[11] who locks.
/// KEYS[1] the lock, KEYS[2] the pattern.
const WATCH_PRELUDE: &str = r#"
local function int(x) return string.format('%d', x) end
local function load(key)
  local f = redis.call('HMGET', key, 'h', 'm', 'b', 'rh', 'ra', 'rr')
  local s = {}
  for i, name in ipairs({'h', 'm', 'b', 'rh', 'ra', 'rr'}) do
    local v = tonumber(f[i] or '0')
    if not v then return nil end
    s[name] = v
  end
  return s
end
local function roll(s, hour, n)
  if s.h == 0 then
    s.h = hour; s.m = 0
  elseif s.h < hour then
    local b = s.b + math.floor((s.m * 1000 - s.b) / n)
    local idle = (hour - s.h) / 3600 - 1
    if idle > 8 * n then b = 0 else for _ = 1, idle do b = b - math.floor(b / n) end end
    if b < 0 then b = 0 end
    s.b = b; s.h = hour; s.m = 0
  end
end
local function roll_rcpt(s, hour)
  if s.rh < hour then s.rh = hour; s.ra = 0; s.rr = 0 end
end
local function finish(s, cause)
  redis.call('HSET', KEYS[2], 'h', int(s.h), 'm', int(s.m), 'b', int(s.b),
    'rh', int(s.rh), 'ra', int(s.ra), 'rr', int(s.rr))
  redis.call('EXPIRE', KEYS[2], ARGV[10])
  if not cause then return nil end
  cause['at'] = tonumber(ARGV[1])
  cause['by'] = ARGV[11]
  local lock = cjson.encode(cause)
  if ARGV[9] == '1' then redis.call('SET', KEYS[1], lock) end
  return {'tripped', lock}
end
local hour, n = tonumber(ARGV[2]), math.max(tonumber(ARGV[6]), 1)
local lock = redis.call('GET', KEYS[1])
if lock then return {'locked', lock} end
"#;

/// R15 + R14 (see [`Store::take_watched`]). KEYS: lock, pattern, then one counter per take.
/// ARGV: as [`WATCH_PRELUDE`], then per take its amount, limit (empty: none) and lifetime.
/// Returns {'locked', lock}, {'refused', i, count}, {'corrupt', key}, {'tripped', lock} or
/// {'ok'}.
static TAKE_WATCHED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "#!lua\n{WATCH_PRELUDE}{}",
        r#"
local base = 11
for i = 3, #KEYS do
  local count = tonumber(redis.call('GET', KEYS[i]) or '0')
  if not count then return {'corrupt', KEYS[i]} end
  local j = i - 2
  local limit = tonumber(ARGV[base + 3 * j - 1])
  if limit and count + tonumber(ARGV[base + 3 * j - 2]) > limit then
    return {'refused', j, count}
  end
end
local s = load(KEYS[2])
if not s then return {'corrupt', KEYS[2]} end
for i = 3, #KEYS do
  local j = i - 2
  redis.call('INCRBY', KEYS[i], ARGV[base + 3 * j - 2])
  redis.call('EXPIRE', KEYS[i], ARGV[base + 3 * j])
end
roll(s, hour, n)
roll_rcpt(s, hour)
s.ra = s.ra + 1
local cause = nil
if ARGV[3] == '1' then
  s.m = s.m + 1
  local threshold = math.max(tonumber(ARGV[5]), math.floor(tonumber(ARGV[4]) * s.b / 1000))
  if s.m > threshold then
    cause = {cause = 'burst', messages = s.m, baseline_milli = s.b, threshold = threshold}
  end
end
return finish(s, cause) or {'ok'}
"#
    ))
});

/// R15: one refused recipient. KEYS, ARGV: as [`WATCH_PRELUDE`]. Returns {'locked', lock},
/// {'corrupt', key}, {'tripped', lock} or {'ok'}.
static COUNT_REJECTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "#!lua\n{WATCH_PRELUDE}{}",
        r#"
local s = load(KEYS[2])
if not s then return {'corrupt', KEYS[2]} end
roll_rcpt(s, hour)
s.rr = s.rr + 1
local total = s.ra + s.rr
local cause = nil
if s.rr >= math.max(tonumber(ARGV[8]), 1) and s.rr * 100 >= tonumber(ARGV[7]) * total then
  cause = {cause = 'rejections', rejected = s.rr, total = total}
end
return finish(s, cause) or {'ok'}
"#
    ))
});

/// R15: KEYS: lock, pattern. ARGV: '1' and the lock to store, or '0' to release it (and
/// clear the current hour's counts). Returns the lock before (nil if none).
static SET_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
local before = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('DEL', KEYS[1])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[2], 'm', '0', 'ra', '0', 'rr', '0')
  end
end
return before
"#,
    )
});

/// R20: KEYS: the last-use hash. ARGV: address, time. Keeps the later time.
static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
local t = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if not t or t < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"#,
    )
});

/// KEYS: the record (an account or an organisation). ARGV: change channel, announcement,
/// encoding version, field,
/// '1' to set it to the value that follows or '0' to remove it, the value.
/// Returns {'ok', before, after}, {'notfound'} or {'corrupt', detail}.
static SET_FIELD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then return {'notfound'} end
local v = redis.call('HGET', KEYS[1], 'v')
if v ~= ARGV[3] then return {'corrupt', 'record version ' .. tostring(v) .. ' is not ' .. ARGV[3]} end
local before = redis.call('HGETALL', KEYS[1])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], ARGV[4], ARGV[6])
else
  redis.call('HDEL', KEYS[1], ARGV[4])
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return {'ok', before, redis.call('HGETALL', KEYS[1])}
"#,
    )
});

/// KEYS: mailbox record, delegate record, the mailbox's delegates, the delegate's mailboxes.
/// ARGV: change channel, mailbox address, delegate address, `add` or `remove`.
/// Returns {'ok', 1|0 (changed)} or {'notfound', address}.
static DELEGATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then return {'notfound', ARGV[2]} end
local changed
if ARGV[4] == 'add' then
  if redis.call('EXISTS', KEYS[2]) == 0 then return {'notfound', ARGV[3]} end
  if ARGV[2] == ARGV[3] then return {'ok', 0} end
  changed = redis.call('ZADD', KEYS[3], 0, ARGV[3])
  redis.call('ZADD', KEYS[4], 0, ARGV[2])
else
  changed = redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('ZREM', KEYS[4], ARGV[2])
end
if changed == 1 then redis.call('PUBLISH', ARGV[1], 'acct:' .. ARGV[2]) end
return {'ok', changed}
"#,
    )
});

/// KEYS: the domain pointer. ARGV: the prefix of organisation record keys.
/// Returns {} or {code, record}.
static GET_ORG_BY_DOMAIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua flags=no-writes
local code = redis.call('GET', KEYS[1])
if not code then return {} end
return {code, redis.call('HGETALL', ARGV[1] .. code)}
"#,
    )
});

/// KEYS: account records. Returns 1/0 per key.
static TAKEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"#!lua flags=no-writes
local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call('EXISTS', k) end
return out
"#,
    )
});

// ---------------------------------------------------------------------------------------
// Records

type Fields = HashMap<String, String>;

fn org_fields(o: &Org) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("v", VERSION.to_owned()),
        ("code", o.code.clone()),
        ("name", o.name.clone()),
        ("domain", o.domain.clone()),
        ("status", o.status.as_str().to_owned()),
        ("created_at", o.created_at.to_string()),
        ("status_changed_at", o.status_changed_at.to_string()),
    ];
    if let Some(r) = &o.status_reason {
        f.push(("status_reason", r.clone()));
    }
    let relays = changed_relays(&o.relay_networks, &[], &[]);
    if !relays.is_empty() {
        f.push(("relays", networks_text(&relays)));
    }
    if let Some(q) = o.default_quota_bytes {
        f.push(("default_quota_bytes", q.to_string()));
    }
    f
}

/// The stored form of relay networks: space-separated CIDRs (the field is absent when none).
fn networks_text(n: &[ipnet::IpNet]) -> String {
    n.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn account_fields(a: &Account) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("v", VERSION.to_owned()),
        ("address", a.address.to_string()),
        ("org", a.org.clone()),
        ("kind", a.kind.as_str().to_owned()),
        ("status", a.status.as_str().to_owned()),
        ("created_at", a.created_at.to_string()),
        ("status_changed_at", a.status_changed_at.to_string()),
    ];
    if let Some(r) = &a.status_reason {
        f.push(("status_reason", r.clone()));
    }
    if let Some(n) = &a.display_name {
        f.push(("display_name", n.clone()));
    }
    if let Some(q) = a.quota_bytes {
        f.push(("quota_bytes", q.to_string()));
    }
    if a.bulk {
        f.push(("bulk", "1".to_owned()));
    }
    f
}

/// A stored hash being decoded; errors name the key and the field.
struct Record {
    key: String,
    fields: Fields,
}

impl Record {
    fn new(key: String, fields: Fields) -> Record {
        Record { key, fields }
    }

    fn corrupt(&self, field: &str, e: impl Display) -> StoreError {
        StoreError::Corrupt(format!("{}: field {field}: {e}", self.key))
    }

    fn check_version(&self) -> StoreResult<()> {
        match self.fields.get("v").map(String::as_str) {
            Some(VERSION) => Ok(()),
            Some(v) => Err(self.corrupt(
                "v",
                format!("record version {v:?} is not supported by this mailwarden ({VERSION})"),
            )),
            None => Err(self.corrupt("v", "missing")),
        }
    }

    fn opt(&mut self, field: &str) -> Option<String> {
        self.fields.remove(field)
    }

    fn req(&mut self, field: &str) -> StoreResult<String> {
        self.opt(field)
            .ok_or_else(|| self.corrupt(field, "missing"))
    }

    fn parse<T: FromStr>(&mut self, field: &str) -> StoreResult<T>
    where
        T::Err: Display,
    {
        let s = self.req(field)?;
        s.parse()
            .map_err(|e| self.corrupt(field, format!("{s:?}: {e}")))
    }

    fn org(mut self) -> StoreResult<Org> {
        self.check_version()?;
        Ok(Org {
            code: self.req("code")?,
            name: self.req("name")?,
            domain: self.req("domain")?,
            status: self.parse("status")?,
            status_reason: self.opt("status_reason"),
            created_at: self.parse("created_at")?,
            status_changed_at: self.parse("status_changed_at")?,
            relay_networks: match self.opt("relays") {
                None => Vec::new(),
                Some(text) => text
                    .split_whitespace()
                    .map(|n| n.parse())
                    .collect::<Result<_, _>>()
                    .map_err(|e| self.corrupt("relays", format!("{text:?}: {e}")))?,
            },
            default_quota_bytes: self.opt_bytes("default_quota_bytes")?,
        })
    }

    /// An optional decimal byte count.
    fn opt_bytes(&mut self, field: &str) -> StoreResult<Option<u64>> {
        match self.opt(field) {
            None => Ok(None),
            Some(q) => q
                .parse::<u64>()
                .map(Some)
                .map_err(|e| self.corrupt(field, format!("{q:?}: {e}"))),
        }
    }

    fn account(mut self) -> StoreResult<Account> {
        self.check_version()?;
        let quota_bytes = self.opt_bytes("quota_bytes")?;
        let bulk = match self.opt("bulk").as_deref() {
            None => false,
            Some("1") => true,
            Some(other) => return Err(self.corrupt("bulk", format!("{other:?} is not 1"))),
        };
        Ok(Account {
            bulk,
            address: self.parse("address")?,
            org: self.req("org")?,
            kind: self.parse("kind")?,
            status: self.parse("status")?,
            status_reason: self.opt("status_reason"),
            display_name: self.opt("display_name"),
            created_at: self.parse("created_at")?,
            status_changed_at: self.parse("status_changed_at")?,
            quota_bytes,
        })
    }
}

/// The [`TakeOutcome`] of [`RedisStore::run_takes`]'s answer.
fn outcome_of(refused: Option<(usize, u64)>, keyed: &[(String, Take)]) -> TakeOutcome {
    match refused {
        None => TakeOutcome::Taken,
        Some((i, count)) => {
            let t = keyed[i].1;
            TakeOutcome::Refused {
                counter: t.counter,
                count,
                limit: t.limit.unwrap_or(u64::MAX),
            }
        }
    }
}

/// The reply of the take scripts: {'ok'}, {'refused', index, count} or {'corrupt', key}.
fn take_outcome(v: Value, takes: &[Take], what: &str) -> StoreResult<TakeOutcome> {
    let Value::Array(mut parts) = v else {
        return Err(unexpected(what, &v));
    };
    let tag: String = match parts.first() {
        Some(t) => decode(t.clone(), what)?,
        None => return Err(StoreError::Corrupt(format!("{what}: empty script reply"))),
    };
    match (tag.as_str(), parts.len()) {
        ("ok", 1) => Ok(TakeOutcome::Taken),
        ("refused", 3) => {
            let count: u64 = decode(parts.pop().unwrap_or_default(), what)?;
            let index: usize = decode(parts.pop().unwrap_or_default(), what)?;
            let t = index
                .checked_sub(1)
                .and_then(|i| takes.get(i))
                .ok_or_else(|| StoreError::Corrupt(format!("{what}: refused take {index}")))?;
            Ok(TakeOutcome::Refused {
                counter: t.counter,
                count,
                limit: t.limit.unwrap_or(u64::MAX),
            })
        }
        ("corrupt", 2) => {
            let key: String = decode(parts.pop().unwrap_or_default(), what)?;
            Err(StoreError::Corrupt(format!("{key} does not hold a count")))
        }
        _ => Err(StoreError::Corrupt(format!(
            "{what}: unexpected script reply {tag:?}"
        ))),
    }
}

/// The reply of the R15 scripts: {'locked', lock}, {'tripped', lock}, or a take's reply.
fn watch_outcome(v: Value, takes: &[Take], what: &str) -> StoreResult<WatchOutcome> {
    if let Value::Array(parts) = &v {
        if let [tag, lock] = parts.as_slice() {
            let tag: String = decode(tag.clone(), what)?;
            if tag == "locked" || tag == "tripped" {
                let text: String = decode(lock.clone(), what)?;
                let lock: SendLock = serde_json::from_str(&text)
                    .map_err(|e| StoreError::Corrupt(format!("{what}: lock {text:?}: {e}")))?;
                return Ok(if tag == "locked" {
                    WatchOutcome::Locked(lock)
                } else {
                    WatchOutcome::Tripped(lock)
                });
            }
        }
    }
    take_outcome(v, takes, what).map(WatchOutcome::Counted)
}

/// The reply of the record-changing scripts (`set_status`, `set_field`): {'ok', before,
/// after}, {'notfound'} or {'corrupt', detail}, for the record `(what, name, key)`.
fn record_change(
    v: Value,
    (what, name, key): (&'static str, String, String),
) -> StoreResult<(Record, Record)> {
    let Value::Array(mut parts) = v else {
        return Err(unexpected(&key, &v));
    };
    let tag: String = match parts.first() {
        Some(t) => decode(t.clone(), &key)?,
        None => return Err(StoreError::Corrupt(format!("{key}: empty script reply"))),
    };
    match (tag.as_str(), parts.len()) {
        ("ok", 3) => {
            let after: Fields = decode(parts.pop().unwrap_or_default(), &key)?;
            let before: Fields = decode(parts.pop().unwrap_or_default(), &key)?;
            Ok((Record::new(key.clone(), before), Record::new(key, after)))
        }
        ("notfound", _) => Err(StoreError::NotFound { what, name }),
        ("corrupt", 2) => {
            let detail: String = decode(parts.pop().unwrap_or_default(), &key)?;
            Err(StoreError::Corrupt(format!("{what} {name}: {detail}")))
        }
        _ => Err(StoreError::Corrupt(format!(
            "{key}: unexpected script reply {tag:?}"
        ))),
    }
}

fn decode<T: ::redis::FromRedisValue>(v: Value, key: &str) -> StoreResult<T> {
    ::redis::from_redis_value(v)
        .map_err(|e| StoreError::Corrupt(format!("{key}: unexpected reply: {e}")))
}

fn unexpected(key: &str, v: &Value) -> StoreError {
    StoreError::Corrupt(format!("{key}: unexpected reply {v:?}"))
}

/// The reply of the create scripts: `ok`, or what was in the way.
enum Outcome {
    Ok,
    Conflict(String),
    NotFound(String),
}

fn outcome(v: Value, key: &str) -> StoreResult<Outcome> {
    let parts: Vec<String> = decode(v, key)?;
    match parts.as_slice() {
        [ok] if ok == "ok" => Ok(Outcome::Ok),
        [tag, name] if tag == "conflict" => Ok(Outcome::Conflict(name.clone())),
        [tag, name] if tag == "notfound" => Ok(Outcome::NotFound(name.clone())),
        other => Err(StoreError::Corrupt(format!(
            "{key}: unexpected script reply {other:?}"
        ))),
    }
}

fn norm(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// The stored name of a status.
trait StatusName: Copy {
    fn name(self) -> &'static str;
}

impl StatusName for OrgStatus {
    fn name(self) -> &'static str {
        self.as_str()
    }
}

impl StatusName for AccountStatus {
    fn name(self) -> &'static str {
        self.as_str()
    }
}

const ORG_STATUSES: &[&str] = &["active", "ceased"];
const ACCOUNT_STATUSES: &[&str] = &["pending", "active", "suspended", "withdrawn"];

#[async_trait]
impl Store for RedisStore {
    async fn create_org(&self, org: &Org) -> StoreResult<()> {
        let org = Org {
            code: norm(&org.code),
            domain: norm(&org.domain),
            ..org.clone()
        };
        let key = self.keys.org(&org.code);
        let mut inv = CREATE_ORG.prepare_invoke();
        inv.key(&key)
            .key(self.keys.domain(&org.domain))
            .key(self.keys.orgs())
            .arg(self.keys.changes())
            .arg(&org.code)
            .arg(&org.domain);
        for (f, v) in org_fields(&org) {
            inv.arg(f).arg(v);
        }
        let v = self.call(Call::Script(&inv), false).await?;
        match outcome(v, &key)? {
            Outcome::Ok => Ok(()),
            Outcome::Conflict(name) => Err(StoreError::Conflict {
                what: "organisation",
                name,
            }),
            Outcome::NotFound(name) => Err(StoreError::Corrupt(format!(
                "{key}: unexpected 'not found' {name}"
            ))),
        }
    }

    async fn get_org(&self, code: &str) -> StoreResult<Option<Org>> {
        let key = self.keys.org(&norm(code));
        match self.read_hash(&key).await? {
            None => Ok(None),
            Some(fields) => Record::new(key, fields).org().map(Some),
        }
    }

    async fn get_org_by_domain(&self, domain: &str) -> StoreResult<Option<Org>> {
        let pointer = self.keys.domain(&norm(domain));
        let mut inv = GET_ORG_BY_DOMAIN.prepare_invoke();
        inv.key(&pointer).arg(self.keys.org_prefix());
        let v = self.call(Call::Script(&inv), true).await?;
        let Value::Array(mut parts) = v else {
            return Err(unexpected(&pointer, &v));
        };
        if parts.is_empty() {
            return Ok(None);
        }
        if parts.len() != 2 {
            return Err(StoreError::Corrupt(format!(
                "{pointer}: unexpected script reply of {} items",
                parts.len()
            )));
        }
        let fields: Fields = decode(parts.pop().unwrap_or_default(), &pointer)?;
        let code: String = decode(parts.pop().unwrap_or_default(), &pointer)?;
        let key = self.keys.org(&code);
        if fields.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "{pointer} points to {key}, which does not exist"
            )));
        }
        Record::new(key, fields).org().map(Some)
    }

    async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
        self.read_indexed(&self.keys.orgs(), |c| self.keys.org(c), Record::org)
            .await
    }

    async fn set_org_status(
        &self,
        code: &str,
        change: &StatusChange<OrgStatus>,
    ) -> StoreResult<(Org, Org)> {
        let code = norm(code);
        let key = self.keys.org(&code);
        let (before, after) = self
            .set_status(
                ("organisation", code.clone(), key),
                change,
                ORG_STATUSES,
                format!("org:{code}"),
            )
            .await?;
        Ok((before.org()?, after.org()?))
    }

    async fn change_org_relays(
        &self,
        code: &str,
        add: &[ipnet::IpNet],
        remove: &[ipnet::IpNet],
    ) -> StoreResult<(Org, Org)> {
        let code = norm(code);
        let key = self.keys.org(&code);
        let not_found = || StoreError::NotFound {
            what: "organisation",
            name: code.clone(),
        };
        // Optimistic: read, compute, write only if unchanged since; a racing change makes
        // us read again (a few rounds at most in practice).
        for _ in 0..16 {
            let current = self.get_org(&code).await?.ok_or_else(not_found)?;
            let old = networks_text(&current.relay_networks);
            let new = networks_text(&changed_relays(&current.relay_networks, add, remove));
            let mut inv = SET_RELAYS.prepare_invoke();
            inv.key(&key)
                .arg(self.keys.changes())
                .arg(format!("org:{code}"))
                .arg(VERSION)
                .arg(&old)
                .arg(&new);
            let v = self.call(Call::Script(&inv), false).await?;
            let Value::Array(mut parts) = v else {
                return Err(unexpected(&key, &v));
            };
            let tag: String = match parts.first() {
                Some(t) => decode(t.clone(), &key)?,
                None => return Err(StoreError::Corrupt(format!("{key}: empty script reply"))),
            };
            match (tag.as_str(), parts.len()) {
                ("ok", 3) => {
                    let after: Fields = decode(parts.pop().unwrap_or_default(), &key)?;
                    let before: Fields = decode(parts.pop().unwrap_or_default(), &key)?;
                    return Ok((
                        Record::new(key.clone(), before).org()?,
                        Record::new(key, after).org()?,
                    ));
                }
                ("changed", _) => continue,
                ("notfound", _) => return Err(not_found()),
                ("corrupt", 2) => {
                    let detail: String = decode(parts.pop().unwrap_or_default(), &key)?;
                    return Err(StoreError::Corrupt(format!(
                        "organisation {code}: {detail}"
                    )));
                }
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "{key}: unexpected script reply {tag:?}"
                    )));
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "relay networks of {code} kept changing under concurrent updates; try again"
        )))
    }

    async fn create_account(&self, account: &Account) -> StoreResult<()> {
        self.create_accounts(std::slice::from_ref(account)).await
    }

    async fn create_accounts(&self, accounts: &[Account]) -> StoreResult<()> {
        if accounts.is_empty() {
            return Ok(());
        }
        let index = self.keys.accounts();
        let mut inv = CREATE_ACCOUNTS.prepare_invoke();
        inv.key(&index).arg(self.keys.changes());
        for a in accounts {
            let a = Account {
                org: norm(&a.org),
                ..a.clone()
            };
            let address = a.address.to_string();
            let fields = account_fields(&a);
            inv.key(self.keys.account(&address))
                .key(self.keys.org(&a.org))
                .key(self.keys.org_accounts(&a.org))
                .arg(&address)
                .arg(&a.org)
                .arg(fields.len() * 2);
            for (f, v) in fields {
                inv.arg(f).arg(v);
            }
        }
        let v = self.call(Call::Script(&inv), false).await?;
        match outcome(v, &index)? {
            Outcome::Ok => Ok(()),
            Outcome::Conflict(name) => Err(StoreError::Conflict {
                what: "account",
                name,
            }),
            Outcome::NotFound(name) => Err(StoreError::NotFound {
                what: "organisation",
                name,
            }),
        }
    }

    async fn get_account(&self, address: &Address) -> StoreResult<Option<Account>> {
        let key = self.keys.account(&address.to_string());
        match self.read_hash(&key).await? {
            None => Ok(None),
            Some(fields) => Record::new(key, fields).account().map(Some),
        }
    }

    async fn list_accounts(&self, org: Option<&str>) -> StoreResult<Vec<Account>> {
        let index = match org {
            Some(code) => self.keys.org_accounts(&norm(code)),
            None => self.keys.accounts(),
        };
        self.read_indexed(&index, |a| self.keys.account(a), Record::account)
            .await
    }

    async fn set_account_status(
        &self,
        address: &Address,
        change: &StatusChange<AccountStatus>,
    ) -> StoreResult<(Account, Account)> {
        let address = address.to_string();
        let key = self.keys.account(&address);
        let (before, after) = self
            .set_status(
                ("account", address.clone(), key),
                change,
                ACCOUNT_STATUSES,
                format!("acct:{address}"),
            )
            .await?;
        Ok((before.account()?, after.account()?))
    }

    async fn set_bulk(&self, address: &Address, bulk: bool) -> StoreResult<(Account, Account)> {
        let value = bulk.then(|| "1".to_owned());
        self.set_field(address, "bulk", value).await
    }

    async fn set_quota(
        &self,
        address: &Address,
        quota_bytes: Option<u64>,
    ) -> StoreResult<(Account, Account)> {
        self.set_field(address, "quota_bytes", quota_bytes.map(|q| q.to_string()))
            .await
    }

    async fn set_usage(&self, address: &Address, bytes: u64, _at: Timestamp) -> StoreResult<()> {
        let key = self.keys.usage(&address.to_string());
        self.call(Call::Cmd(::redis::cmd("SET").arg(&key).arg(bytes)), true)
            .await?;
        Ok(())
    }

    async fn usage(&self, address: &Address) -> StoreResult<Option<u64>> {
        let key = self.keys.usage(&address.to_string());
        let v = self
            .call(Call::Cmd(::redis::cmd("GET").arg(&key)), true)
            .await?;
        let s: Option<String> = decode(v, &key)?;
        s.map(|s| {
            s.parse::<u64>()
                .map_err(|_| StoreError::Corrupt(format!("{key} holds {s:?}")))
        })
        .transpose()
    }

    async fn take(
        &self,
        account: &Address,
        takes: &[Take],
        now: Timestamp,
    ) -> StoreResult<TakeOutcome> {
        let address = account.to_string();
        let keyed: Vec<(String, Take)> = takes
            .iter()
            .map(|t| {
                let key = self
                    .keys
                    .counter(&address, t.counter, t.counter.window.start(now));
                (key, *t)
            })
            .collect();
        let refused = self
            .run_takes(&keyed, now, &format!("counters of {address}"))
            .await?;
        Ok(outcome_of(refused, &keyed))
    }

    async fn counters(&self, account: &Address, now: Timestamp) -> StoreResult<Vec<CounterValue>> {
        let address = account.to_string();
        self.read_counters(
            |c| self.keys.counter(&address, c, c.window.start(now)),
            now,
            &format!("counters of {address}"),
        )
        .await
    }

    async fn reset_counters(&self, account: &Address, now: Timestamp) -> StoreResult<()> {
        let address = account.to_string();
        // The current windows, and the previous ones (an instance whose clock lags may
        // still count there). Older windows have expired.
        let mut del = ::redis::cmd("DEL");
        for c in Counter::ALL {
            let start = c.window.start(now);
            del.arg(self.keys.counter(&address, c, start))
                .arg(self.keys.counter(&address, c, start - c.window.seconds()));
        }
        self.call(Call::Cmd(&del), true).await?;
        Ok(())
    }

    async fn taken_locals(&self, domain: &str, locals: &[String]) -> StoreResult<Vec<String>> {
        // Normalised exactly like a registered address; a candidate that is not a valid
        // address cannot be registered, so it is not taken.
        let candidates: Vec<(String, String)> = locals
            .iter()
            .filter_map(|l| {
                Address::parse(&format!("{l}@{domain}"))
                    .ok()
                    .map(|a| (l.clone(), self.keys.account(&a.to_string())))
            })
            .collect();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = TAKEN.prepare_invoke();
        for (_, key) in &candidates {
            inv.key(key);
        }
        let v = self.call(Call::Script(&inv), true).await?;
        let flags: Vec<i64> = decode(v, "taken_locals")?;
        if flags.len() != candidates.len() {
            return Err(StoreError::Corrupt(format!(
                "taken_locals: asked for {} names, got {} answers",
                candidates.len(),
                flags.len()
            )));
        }
        Ok(candidates
            .into_iter()
            .zip(flags)
            .filter(|(_, taken)| *taken == 1)
            .map(|((local, _), _)| local)
            .collect())
    }

    async fn ping(&self) -> StoreResult<()> {
        let v = self.call(Call::Cmd(&::redis::cmd("PING")), true).await?;
        match v {
            Value::SimpleString(s) if s == "PONG" => Ok(()),
            other => Err(StoreError::Unavailable(format!(
                "Redis answered PING with {other:?}"
            ))),
        }
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn record_login_country(
        &self,
        account: &Address,
        country: &str,
        at: Timestamp,
    ) -> StoreResult<LoginCountry> {
        let key = self.keys.countries(&account.to_string());
        let mut inv = RECORD_COUNTRY.prepare_invoke();
        inv.key(&key).arg(country).arg(at);
        // Not retried: a script whose connection broke may have run, and its retry would
        // find the country known and lose the alert.
        let v = self.call(Call::Script(&inv), false).await?;
        let (added, mut known_before): (i64, Vec<String>) = decode(v, &key)?;
        known_before.sort();
        Ok(LoginCountry {
            new: added == 1,
            known_before,
        })
    }

    async fn login_countries(&self, account: &Address) -> StoreResult<Vec<String>> {
        let key = self.keys.countries(&account.to_string());
        let v = self
            .call(Call::Cmd(::redis::cmd("HKEYS").arg(&key)), true)
            .await?;
        let mut countries: Vec<String> = decode(v, &key)?;
        countries.sort();
        Ok(countries)
    }

    async fn add_delegate(&self, mailbox: &Address, delegate: &Address) -> StoreResult<bool> {
        self.delegate(mailbox, delegate, "add").await
    }

    async fn remove_delegate(&self, mailbox: &Address, delegate: &Address) -> StoreResult<bool> {
        self.delegate(mailbox, delegate, "remove").await
    }

    async fn delegates(&self, mailbox: &Address) -> StoreResult<Vec<Address>> {
        self.address_set(&self.keys.delegates(&mailbox.to_string()))
            .await
    }

    async fn delegated_to(&self, delegate: &Address) -> StoreResult<Vec<Address>> {
        self.address_set(&self.keys.delegated(&delegate.to_string()))
            .await
    }

    async fn take_watched(
        &self,
        account: &Address,
        takes: &[Take],
        watch: &Watch,
        message: bool,
        now: Timestamp,
    ) -> StoreResult<WatchOutcome> {
        let address = account.to_string();
        let mut inv = TAKE_WATCHED.prepare_invoke();
        self.watch_args(&mut inv, &address, watch, message, now);
        for t in takes {
            let w = t.counter.window;
            let ttl = w.end(now) - now + w.seconds();
            inv.key(self.keys.counter(&address, t.counter, w.start(now)))
                .arg(t.n)
                .arg(t.limit.map(|l| l.to_string()).unwrap_or_default())
                .arg(ttl);
        }
        // Not retried, like `take`.
        let v = self.call(Call::Script(&inv), false).await?;
        watch_outcome(v, takes, &format!("sending pattern of {address}"))
    }

    async fn count_rejected(
        &self,
        account: &Address,
        watch: &Watch,
        now: Timestamp,
    ) -> StoreResult<WatchOutcome> {
        let address = account.to_string();
        let mut inv = COUNT_REJECTED.prepare_invoke();
        self.watch_args(&mut inv, &address, watch, false, now);
        let v = self.call(Call::Script(&inv), false).await?;
        watch_outcome(v, &[], &format!("sending pattern of {address}"))
    }

    async fn send_lock(&self, account: &Address) -> StoreResult<Option<SendLock>> {
        let key = self.keys.lock(&account.to_string());
        let v = self
            .call(Call::Cmd(::redis::cmd("GET").arg(&key)), true)
            .await?;
        let text: Option<String> = decode(v, &key)?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| StoreError::Corrupt(format!("{key} holds {t:?}: {e}")))
        })
        .transpose()
    }

    async fn set_send_lock(
        &self,
        account: &Address,
        lock: Option<&SendLock>,
    ) -> StoreResult<Option<SendLock>> {
        let address = account.to_string();
        let key = self.keys.lock(&address);
        let mut inv = SET_LOCK.prepare_invoke();
        inv.key(&key).key(self.keys.watch(&address));
        match lock {
            Some(l) => {
                let text = serde_json::to_string(l)
                    .map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))?;
                inv.arg("1").arg(text);
            }
            None => {
                inv.arg("0").arg("");
            }
        }
        let v = self.call(Call::Script(&inv), false).await?;
        let before: Option<String> = decode(v, &key)?;
        before
            .map(|t| {
                serde_json::from_str(&t)
                    .map_err(|e| StoreError::Corrupt(format!("{key} held {t:?}: {e}")))
            })
            .transpose()
    }

    async fn watch_state(&self, account: &Address) -> StoreResult<WatchState> {
        let key = self.keys.watch(&account.to_string());
        let v = self
            .call(
                Call::Cmd(
                    ::redis::cmd("HMGET")
                        .arg(&key)
                        .arg(&["h", "m", "b", "rh", "ra", "rr"]),
                ),
                true,
            )
            .await?;
        let f: Vec<Option<String>> = decode(v, &key)?;
        let mut n = [0i64; 6];
        for (slot, value) in n.iter_mut().zip(&f) {
            if let Some(text) = value {
                *slot = text
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("{key} holds {text:?}")))?;
            }
        }
        let u = |v: i64| u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{key}: {v}")));
        Ok(WatchState {
            hour: n[0],
            messages: u(n[1])?,
            baseline_milli: u(n[2])?,
            rej_hour: n[3],
            accepted: u(n[4])?,
            rejected: u(n[5])?,
        })
    }

    async fn touch(&self, account: &Address, at: Timestamp) -> StoreResult<()> {
        let mut inv = TOUCH.prepare_invoke();
        inv.key(self.keys.last_use())
            .arg(account.to_string())
            .arg(at);
        self.call(Call::Script(&inv), false).await?;
        Ok(())
    }

    async fn last_use(&self, accounts: &[Address]) -> StoreResult<Vec<Option<Timestamp>>> {
        let key = self.keys.last_use();
        let mut out = Vec::with_capacity(accounts.len());
        for batch in accounts.chunks(LIST_BATCH) {
            let mut cmd = ::redis::cmd("HMGET");
            cmd.arg(&key);
            for a in batch {
                cmd.arg(a.to_string());
            }
            let v = self.call(Call::Cmd(&cmd), true).await?;
            let times: Vec<Option<String>> = decode(v, &key)?;
            if times.len() != batch.len() {
                return Err(StoreError::Corrupt(format!(
                    "{key}: asked for {} accounts, got {}",
                    batch.len(),
                    times.len()
                )));
            }
            for t in times {
                out.push(
                    t.map(|t| {
                        t.parse::<Timestamp>()
                            .map_err(|_| StoreError::Corrupt(format!("{key} holds {t:?}")))
                    })
                    .transpose()?,
                );
            }
        }
        Ok(out)
    }

    fn changes(&self) -> Option<broadcast::Receiver<DirectoryChange>> {
        let feed = self.feed.get_or_init(|| {
            let (tx, _) = broadcast::channel(FEED_CAPACITY);
            let task = tokio::spawn(follow_feed(
                self.url.clone(),
                self.keys.changes(),
                tx.clone(),
            ));
            Feed {
                tx,
                _task: AbortOnDropHandle::new(task),
            }
        });
        Some(feed.tx.subscribe())
    }

    fn stats(&self) -> Option<StoreStats> {
        Some(self.stats.clone())
    }

    async fn set_org_quota(&self, code: &str, quota_bytes: Option<u64>) -> StoreResult<(Org, Org)> {
        let code = norm(code);
        let key = self.keys.org(&code);
        let (before, after) = self
            .set_record_field(
                ("organisation", code.clone(), key),
                format!("org:{code}"),
                "default_quota_bytes",
                quota_bytes.map(|q| q.to_string()),
            )
            .await?;
        Ok((before.org()?, after.org()?))
    }

    async fn add_usage(&self, address: &Address, bytes: u64) -> StoreResult<u64> {
        // The key Dovecot's quota_clone writes (a decimal string, which INCRBY takes): one
        // atomic command. Not retried: an INCRBY whose connection broke may have run.
        let key = self.keys.usage(&address.to_string());
        let bytes = i64::try_from(bytes).map_err(|_| {
            StoreError::Corrupt(format!("delivered size {bytes} for {address} is too large"))
        })?;
        let v = self
            .call(
                Call::Cmd(::redis::cmd("INCRBY").arg(&key).arg(bytes)),
                false,
            )
            .await
            .map_err(|e| match e {
                // INCRBY refuses a value that is not an integer (or would overflow).
                StoreError::Unavailable(m) if m.contains("not an integer") => {
                    StoreError::Corrupt(format!("{key}: {m}"))
                }
                e => e,
            })?;
        let after: i64 = decode(v, &key)?;
        u64::try_from(after).map_err(|_| StoreError::Corrupt(format!("{key} holds {after}")))
    }

    async fn take_with_org(
        &self,
        account: &Address,
        takes: &[Take],
        org: &str,
        org_takes: &[Take],
        now: Timestamp,
    ) -> StoreResult<JointTakeOutcome> {
        let address = account.to_string();
        let code = norm(org);
        let keyed: Vec<(String, Take)> = takes
            .iter()
            .map(|t| {
                let key = self
                    .keys
                    .counter(&address, t.counter, t.counter.window.start(now));
                (key, *t)
            })
            .collect();
        let org_keyed: Vec<(String, Take)> = org_takes
            .iter()
            .map(|t| {
                let key = self
                    .keys
                    .org_counter(&code, t.counter, t.counter.window.start(now));
                (key, *t)
            })
            .collect();
        let what = format!("counters of {address} and organisation {code}");
        if !matches!(self.backend, Backend::Cluster(_)) || org_keyed.is_empty() {
            // One server: one script over both slots' keys, one round trip.
            let all: Vec<(String, Take)> = keyed.iter().chain(&org_keyed).cloned().collect();
            let refused = self.run_takes(&all, now, &what).await?;
            let by_org = refused.is_some_and(|(i, _)| i >= keyed.len());
            return Ok(JointTakeOutcome {
                outcome: outcome_of(refused, &all),
                by_org,
            });
        }
        // Cluster: the organisation's keys are in another slot. The account's take first
        // (refused: nothing changed), then the organisation's; if that refuses or fails,
        // the account's take is given back (see the module docs).
        let refused = self.run_takes(&keyed, now, &what).await?;
        if refused.is_some() {
            return Ok(JointTakeOutcome {
                outcome: outcome_of(refused, &keyed),
                by_org: false,
            });
        }
        let org_result = self.run_takes(&org_keyed, now, &what).await;
        if !matches!(org_result, Ok(None)) {
            if let Err(e) = self.give_back(&keyed).await {
                // Counted one too many for the account until the window ends: the safe side.
                tracing::warn!(account = %address, "could not give back a sending count: {e}");
            }
        }
        let refused = org_result?;
        Ok(JointTakeOutcome {
            outcome: outcome_of(refused, &org_keyed),
            by_org: refused.is_some(),
        })
    }

    async fn org_counters(&self, org: &str, now: Timestamp) -> StoreResult<Vec<CounterValue>> {
        let code = norm(org);
        self.read_counters(
            |c| self.keys.org_counter(&code, c, c.window.start(now)),
            now,
            &format!("counters of organisation {code}"),
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------
// Change feed

/// Subscribes to the change channel and forwards what arrives, reconnecting (with backoff)
/// whenever the subscription breaks. Each (re)subscription first sends
/// [`DirectoryChange::All`]: announcements made while it was not subscribed are lost.
async fn follow_feed(url: RedisUrl, channel: String, tx: broadcast::Sender<DirectoryChange>) {
    const MIN_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut backoff = MIN_BACKOFF;
    loop {
        let subscribed = tokio::time::timeout(url.timeout, async {
            let mut pubsub = subscriber(&url).await?.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        })
        .await;
        match subscribed {
            Ok(Ok(pubsub)) => {
                backoff = MIN_BACKOFF;
                tracing::debug!("subscribed to the directory change feed");
                let _ = tx.send(DirectoryChange::All);
                let (mut sink, mut messages) = pubsub.split();
                let mut ping = tokio::time::interval(FEED_PING);
                ping.tick().await;
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => match parse_change(msg.get_payload_bytes()) {
                                Some(change) => { let _ = tx.send(change); }
                                None => tracing::warn!("ignoring an unknown directory change announcement"),
                            },
                            None => break,
                        },
                        _ = ping.tick() => {
                            let alive = tokio::time::timeout(url.timeout, sink.ping::<Value>()).await;
                            if !matches!(alive, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                tracing::warn!("directory change feed interrupted; subscribing again");
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot subscribe to the directory change feed")
            }
            Err(_) => tracing::warn!("subscribing to the directory change feed timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A client for the node to subscribe on. Announcements reach every node: Redis replicates
/// PUBLISH to replicas and broadcasts it across a cluster.
async fn subscriber(url: &RedisUrl) -> RedisResult<Client> {
    match &url.topology {
        Topology::Standalone { node, tls } => standalone_client(url, node, *tls),
        Topology::Sentinel { sentinels, service } => {
            let mut resolver = sentinel_client(url, sentinels, service)?;
            resolver.async_get_client().await
        }
        Topology::Cluster { nodes } => {
            // The first node that answers.
            let mut last = None;
            for n in nodes {
                let info = ConnectionAddr::Tcp(n.host.clone(), n.port)
                    .into_connection_info()?
                    .set_redis_settings(redis_settings(url).set_db(0));
                let client = Client::open(info)?;
                match client.get_multiplexed_async_connection().await {
                    Ok(_) => return Ok(client),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                RedisError::from((ErrorKind::InvalidClientConfig, "no cluster node"))
            }))
        }
    }
}

/// `acct:<address>`, `org:<code>` or `all`.
fn parse_change(payload: &[u8]) -> Option<DirectoryChange> {
    let s = std::str::from_utf8(payload).ok()?;
    if s == "all" {
        return Some(DirectoryChange::All);
    }
    if let Some(a) = s.strip_prefix("acct:") {
        return Address::parse(a).ok().map(DirectoryChange::Account);
    }
    s.strip_prefix("org:")
        .map(|c| DirectoryChange::Org(c.to_owned()))
}

// ---------------------------------------------------------------------------------------
// Connections

/// What one round trip sends.
enum Call<'a> {
    Cmd(&'a Cmd),
    Pipe(&'a Pipeline),
    Script(&'a ScriptInvocation<'static>),
}

async fn exec<C>(conn: &mut C, call: &Call<'_>) -> RedisResult<Value>
where
    C: ::redis::aio::ConnectionLike + Send,
{
    match call {
        Call::Cmd(c) => c.query_async(conn).await,
        Call::Pipe(p) => p.query_async(conn).await,
        Call::Script(s) => s.invoke_async(conn).await,
    }
}

enum Backend {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Box<SentinelPrimary>),
}

impl Backend {
    async fn run(
        &self,
        call: &Call<'_>,
        idempotent: bool,
        stats: &StoreStats,
    ) -> RedisResult<Value> {
        let mut retried = false;
        loop {
            stats.round_trips.inc();
            let result = match self {
                Backend::Standalone(c) => exec(&mut c.clone(), call).await,
                Backend::Cluster(c) => exec(&mut c.clone(), call).await,
                Backend::Sentinel(s) => s.run(call).await,
            };
            match result {
                Err(e) if !retried && (is_readonly(&e) || idempotent && is_broken(&e)) => {
                    tracing::debug!(error = %e, "Redis call failed; retrying once");
                    retried = true;
                }
                r => return r,
            }
        }
    }
}

/// The node refused a write because it is a replica (it was demoted): nothing was executed.
fn is_readonly(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// The connection (not the command) failed.
fn is_broken(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.kind() == ErrorKind::ClusterConnectionNotFound
}

fn redis_settings(url: &RedisUrl) -> RedisConnectionInfo {
    let mut info = RedisConnectionInfo::default().set_db(url.db);
    if let Some(u) = &url.username {
        info = info.set_username(u);
    }
    if let Some(p) = &url.password {
        info = info.set_password(p.expose());
    }
    info
}

async fn standalone(url: &RedisUrl, node: &Node, tls: bool) -> RedisResult<Backend> {
    let client = standalone_client(url, node, tls)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(url.timeout))
        .set_response_timeout(Some(url.timeout))
        .set_number_of_retries(2);
    Ok(Backend::Standalone(
        ConnectionManager::new_with_config(client, config).await?,
    ))
}

fn standalone_client(url: &RedisUrl, node: &Node, tls: bool) -> RedisResult<Client> {
    let addr = if tls {
        ConnectionAddr::TcpTls {
            host: node.host.clone(),
            port: node.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(node.host.clone(), node.port)
    };
    let info = addr
        .into_connection_info()?
        .set_redis_settings(redis_settings(url));
    let client = match &url.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "cannot read the ca= file",
                    format!("{}: {e}", path.display()),
                ))
            })?;
            Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )?
        }
        None => Client::open(info)?,
    };
    Ok(client)
}

async fn cluster(url: &RedisUrl, nodes: &[Node]) -> RedisResult<Backend> {
    let nodes = nodes
        .iter()
        .map(|n| ConnectionAddr::Tcp(n.host.clone(), n.port).into_connection_info())
        .collect::<RedisResult<Vec<_>>>()?;
    let mut builder = ClusterClientBuilder::new(nodes)
        .connection_timeout(url.timeout)
        .response_timeout(url.timeout);
    if let Some(u) = &url.username {
        builder = builder.username(u);
    }
    if let Some(p) = &url.password {
        builder = builder.password(p.expose());
    }
    let client = builder.build()?;
    Ok(Backend::Cluster(client.get_async_connection().await?))
}

fn sentinel(url: &RedisUrl, sentinels: &[Node], service: &str) -> RedisResult<Backend> {
    Ok(Backend::Sentinel(Box::new(SentinelPrimary {
        resolver: tokio::sync::Mutex::new(sentinel_client(url, sentinels, service)?),
        current: Mutex::new(None),
        generation: AtomicU64::new(0),
        config: AsyncConnectionConfig::new()
            .set_connection_timeout(Some(url.timeout))
            .set_response_timeout(Some(url.timeout)),
    })))
}

fn sentinel_client(
    url: &RedisUrl,
    sentinels: &[Node],
    service: &str,
) -> RedisResult<SentinelClient> {
    let addrs = sentinels
        .iter()
        .map(|n| ConnectionAddr::Tcp(n.host.clone(), n.port));
    let mut b = SentinelClientBuilder::new(addrs, service, SentinelServerType::Master)?
        .set_client_to_redis_db(url.db);
    if let Some(u) = &url.username {
        b = b.set_client_to_redis_username(u);
    }
    if let Some(p) = &url.password {
        b = b.set_client_to_redis_password(p.expose());
    }
    if let Some(u) = &url.sentinel_username {
        b = b.set_client_to_sentinel_username(u);
    }
    if let Some(p) = &url.sentinel_password {
        b = b.set_client_to_sentinel_password(p.expose());
    }
    b.build()
}

/// The primary of a Sentinel-monitored deployment, re-resolved after connection errors and
/// `READONLY` replies (a `ConnectionManager` would keep reconnecting to the old address).
struct SentinelPrimary {
    /// Asks the sentinels; one lookup at a time, so a failover does not cause a stampede.
    resolver: tokio::sync::Mutex<SentinelClient>,
    /// The connection in use and its generation; `None` until (re-)resolved.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    config: AsyncConnectionConfig,
}

impl SentinelPrimary {
    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let mut resolver = self.resolver.lock().await;
        // Another task may have resolved it while this one waited for the lock.
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let client = resolver.async_get_client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, conn.clone()));
        tracing::info!(
            primary = %client.get_connection_info().addr(),
            generation,
            "Redis primary resolved through Sentinel"
        );
        Ok((generation, conn))
    }

    /// Drops connection `generation` (if still current), so the next call asks the sentinels.
    fn forget(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().map(|(g, _)| *g) == Some(generation) {
            *current = None;
        }
    }

    async fn run(&self, call: &Call<'_>) -> RedisResult<Value> {
        let (generation, mut conn) = self.connection().await?;
        let result = exec(&mut conn, call).await;
        if let Err(e) = &result
            && (is_broken(e) || is_readonly(e))
        {
            tracing::warn!(error = %e, "Redis primary failed; asking the sentinels again");
            self.forget(generation);
        }
        result
    }
}

#[cfg(test)]
mod servers;
#[cfg(test)]
mod tests;
