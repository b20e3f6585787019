//! The shared tier: a Redis cache behind each replica's in-memory one, purges announced to every
//! replica, and the partner quota counted across replicas. Optional: without `[redis]` none of
//! this exists.
//!
//! Redis is a helper, never a dependency. Every command is bounded by `redis.command_timeout_ms`;
//! the first lost connection or timeout marks the tier down (a metric and one log line), after
//! which commands are not even tried: lookups go to the partner, the quota falls back to the
//! local limiter, and readiness stays green. Every `redis.recovery_interval_ms` a background
//! task either beats (an up tier) or opens fresh connections and, once every one answers and the
//! purges made meanwhile are replayed, marks the tier up again (a metric and one log line).
//!
//! What reaches Redis is sealed first (see [`seal`]): keys are keyed hashes, values are encrypted
//! and authenticated, and the purge channel carries only hashes.
//!
//! Purges are made so that none is lost or undone (see the `purge` module): a tombstone stops a lookup
//! already running anywhere from writing the old answer back, and a replica that was not
//! listening catches up from a purge log when it subscribes again.

mod purge;
mod quota;
pub mod seal;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures_util::future::join_all;
use futures_util::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
use redis::{IntoConnectionInfo as _, RedisResult};
use secrecy::ExposeSecret;
use tokio::time::{timeout, Instant};

use crate::config::RedisSettings;
use crate::domain::CustomerEmail;
use crate::metrics::SharedTierMetrics;
use purge::{Announcement, LogId, Plan};
use seal::Sealer;

/// Length of one index digest, as the purge channel carries them.
pub const DIGEST: usize = 16;

/// What another replica's purge asks this one to drop from memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purged<'a> {
    /// The entry with this index digest.
    Entry(&'a [u8; DIGEST]),
    /// Everything: purges may have been missed and cannot be told apart any more.
    All,
}

/// The Redis tier of one instance. Cheap to clone.
#[derive(Clone)]
pub struct SharedTier {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    pool_size: usize,
    /// Replaced whole on every recovery: a connection whose peer vanished without a reset, or
    /// whose login failed, is not trusted to heal itself.
    pool: RwLock<Arc<[ConnectionManager]>>,
    next: AtomicUsize,
    sealer: Sealer,
    prefix: String,
    channel: String,
    log_key: String,
    quota_key: String,
    quota_script: redis::Script,
    purge_script: redis::Script,
    store_script: redis::Script,
    /// Microseconds between calls, and the burst tolerance.
    quota_args: (u64, u64),
    /// The furthest ahead the quota can legitimately be booked, in microseconds.
    quota_horizon_us: u64,
    command_timeout: Duration,
    connect_timeout: Duration,
    recovery_interval: Duration,
    /// The longest a lookup may run before its store; a later store is skipped, so that a
    /// tombstone (which outlives this) always covers it.
    store_window: Duration,
    tombstone_ms: u64,
    /// This instance's name on the purge channel, to tell its own announcements.
    instance: String,
    up: AtomicBool,
    subscribed: AtomicBool,
    /// Redis's clock minus this host's, in microseconds, once measured.
    clock_offset_us: AtomicI64,
    clock_synced: AtomicBool,
    missed_heartbeats: AtomicUsize,
    /// Purges go to Redis: while up, and already while recovering (so that purges made during
    /// the replay of those pending do not keep the tier down).
    purges_open: AtomicBool,
    /// Purges Redis could not be told of: replayed before the tier counts as up again, so an
    /// entry purged during an outage is not served from Redis afterwards.
    pending_purges: Mutex<Vec<PendingPurge>>,
    metrics: SharedTierMetrics,
}

/// A purge Redis has not been told of yet.
struct PendingPurge {
    names: EntryNames,
    /// Replays Redis refused so far.
    refusals: u32,
}

/// Replays of a purge refused for a reason not known to pass before it is dropped (a minute at
/// the default recovery interval).
const MAX_UNKNOWN_REFUSALS: u32 = 60;

/// Bound on purges remembered during an outage (the oldest are dropped beyond it).
const MAX_PENDING_PURGES: usize = 10_000;

/// The least time a booked quota slot leaves the partner call before the lookup's deadline.
const MIN_CALL_TIME: Duration = Duration::from_millis(100);

/// Catch-ups tried, one per recovery interval, before a replica that cannot read the purge log
/// listens anyway and distrusts its memory (at once for a refusal that will not pass).
const CATCH_UP_ATTEMPTS: u32 = 10;

/// Purges replayed per round trip after an outage.
const REPLAY_BATCH: usize = 100;

/// The Redis names of one e-mail's entry: one per configured secret, newest first.
#[derive(Clone)]
pub struct EntryNames {
    digests: Vec<[u8; DIGEST]>,
    keys: Vec<String>,
}

impl EntryNames {
    /// The index under the newest secret (the in-memory cache key of a shared-tier instance).
    pub fn newest(&self) -> [u8; DIGEST] {
        self.digests.first().copied().unwrap_or_default()
    }
}

/// What the global quota said about one partner call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaDecision {
    /// The call may start.
    Granted,
    /// No slot before the lookup's deadline.
    Refused,
    /// Redis did not answer: only the local limiter applies.
    Unavailable,
}

/// Why a command did not give an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotRun {
    /// The tier was down: not even tried.
    Down,
    /// Tried, and it failed or timed out.
    Failed,
}

impl SharedTier {
    /// Sets up the connections (lazily: nothing is dialled here) and the sealing keys.
    /// `per_s` is the global partner quota and `deadline` the longest a lookup may take.
    pub fn new(
        settings: &RedisSettings,
        per_s: u32,
        deadline: Duration,
        metrics: SharedTierMetrics,
    ) -> RedisResult<Self> {
        let info = settings
            .url
            .expose_secret()
            .into_connection_info()?
            .set_tcp_settings(tcp_settings());
        let client = redis::Client::open(info)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.command_timeout))
            // Reconnection is paced by the recovery task, not by retries inside a command.
            .set_number_of_retries(0);
        let pool = new_pool(&client, &manager_config, settings.pool_size)?;
        let prefix = settings.key_prefix.clone();
        let (interval_us, tolerance_us) = quota::gcra_args(per_s);
        let store_window = deadline + settings.command_timeout * 2;
        let tombstone = store_window + settings.command_timeout + Duration::from_secs(1);
        let tier = Self {
            inner: Arc::new(Inner {
                client,
                manager_config,
                pool_size: settings.pool_size,
                pool: RwLock::new(pool),
                next: AtomicUsize::new(0),
                sealer: Sealer::new(&settings.encryption_keys),
                channel: format!("{prefix}purge"),
                log_key: format!("{prefix}purge-log"),
                // The rate is part of the key: replicas that disagree on it during a rollout
                // keep separate budgets instead of misreading each other's.
                quota_key: format!("{prefix}quota:{interval_us}:{tolerance_us}"),
                quota_script: redis::Script::new(quota::GCRA_LUA),
                purge_script: redis::Script::new(purge::PURGE_LUA),
                store_script: redis::Script::new(purge::STORE_LUA),
                quota_args: (interval_us, tolerance_us),
                // Twice the furthest any booking reaches, so that replicas configured with a
                // longer deadline (during a rollout) are not taken for a clock gone back.
                quota_horizon_us: 2 * (interval_us + tolerance_us + micros(deadline)),
                prefix,
                command_timeout: settings.command_timeout,
                connect_timeout: settings.connect_timeout,
                recovery_interval: settings.recovery_interval,
                store_window,
                tombstone_ms: u64::try_from(tombstone.as_millis()).unwrap_or(u64::MAX),
                instance: format!("{:016x}", rand::random::<u64>()),
                up: AtomicBool::new(false),
                subscribed: AtomicBool::new(false),
                clock_offset_us: AtomicI64::new(0),
                clock_synced: AtomicBool::new(false),
                missed_heartbeats: AtomicUsize::new(0),
                purges_open: AtomicBool::new(false),
                pending_purges: Mutex::new(Vec::new()),
                metrics,
            }),
        };
        Ok(tier)
    }

    /// Connects and subscribes (waiting at most two `redis.connect_timeout_ms` plus five
    /// command timeouts), then starts the recovery task beside the purge subscriber, which calls `on_purge` for every purge another replica makes. Redis
    /// being unreachable here is logged, not fatal: the tier starts down and recovers.
    pub async fn start(&self, on_purge: impl Fn(Purged<'_>) + Send + Sync + 'static) {
        let weak = Arc::downgrade(&self.inner);
        // The first subscription is made before anything is cached, so it has nothing to
        // catch up on; start-up waits for it (bounded by the attempt's own timeouts), while
        // the pool is pinged.
        let (first, first_done) = tokio::sync::oneshot::channel();
        tokio::spawn(subscribe(weak.clone(), on_purge, first));
        let pool = self.inner.current_pool();
        let up = self.inner.ping_pool(&pool).await;
        self.inner.purges_open.store(up, Ordering::SeqCst);
        self.inner.up.store(up, Ordering::SeqCst);
        self.inner.metrics.set_up(up);
        if up {
            self.inner.sync_clock().await;
            tracing::info!(connections = pool.len(), "shared tier connected");
        } else {
            tracing::warn!(
                "shared tier unreachable at start-up: serving from local state until Redis answers"
            );
        }
        tokio::spawn(recover(weak));
        let _ = first_done.await;
    }

    /// Whether Redis answered the last command.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::SeqCst)
    }

    /// Whether the purge channel is subscribed.
    pub fn is_subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::SeqCst)
    }

    /// `up` or `down`, for `/readyz`.
    pub fn state_label(&self) -> &'static str {
        if self.is_up() {
            "up"
        } else {
            "down"
        }
    }

    /// The in-memory cache key of an address: its index under the newest secret.
    pub fn cache_digest(&self, email: &CustomerEmail) -> [u8; DIGEST] {
        self.inner.sealer.digest(0, email.as_str())
    }

    /// The Redis names of an address's entry under every configured secret.
    pub fn names(&self, email: &CustomerEmail) -> EntryNames {
        let inner = &*self.inner;
        let digests: Vec<_> = (0..inner.sealer.len())
            .map(|i| inner.sealer.digest(i, email.as_str()))
            .collect();
        let keys = digests.iter().map(|d| inner.name("v1", d)).collect();
        EntryNames { digests, keys }
    }

    /// Reads an entry: the first name that holds a value this instance can open. `None` on a
    /// miss, an unreadable value, or Redis unavailable.
    pub async fn fetch(&self, names: &EntryNames) -> Option<Vec<u8>> {
        let inner = &*self.inner;
        let metrics = &inner.metrics;
        let read = inner
            .run("get", |mut conn| async move {
                redis::cmd("MGET")
                    .arg(&names.keys)
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                    .await
            })
            .await;
        let values = match read {
            Ok(values) => values,
            Err(not_run) => {
                metrics.lookup(match not_run {
                    NotRun::Down => "skipped",
                    NotRun::Failed => "error",
                });
                return None;
            }
        };
        for (i, value) in values.iter().enumerate() {
            let (Some(value), Some(key)) = (value, names.keys.get(i)) else {
                continue;
            };
            match inner.sealer.open(i, key.as_bytes(), value) {
                Some(plain) => return Some(plain),
                None => {
                    metrics.lookup("unreadable");
                    tracing::warn!(
                        "a shared-tier value failed authentication: ignored (altered, or sealed \
                         under a key this instance does not have)"
                    );
                }
            }
        }
        metrics.lookup("miss");
        None
    }

    /// Counts a fetched entry as a fresh or stale hit.
    pub fn record_hit(&self, fresh: bool) {
        self.inner
            .metrics
            .lookup(if fresh { "hit" } else { "stale" });
    }

    /// Writes an entry under the newest secret, to live `ttl` in Redis, unless a purge since
    /// the lookup `started` forbids it (its tombstone is still there), or the lookup ran so
    /// long that the tombstone may be gone (judged here, and again on Redis's clock when the
    /// write runs).
    pub async fn store(
        &self,
        names: &EntryNames,
        plaintext: &[u8],
        ttl: Duration,
        started: std::time::Instant,
    ) {
        let inner = &*self.inner;
        let ran = started.elapsed();
        if ran > inner.store_window {
            inner.metrics.store("late");
            tracing::debug!("lookup outlived its store window: not written to the shared tier");
            return;
        }
        let latest_us = if inner.clock_synced.load(Ordering::SeqCst) {
            let window_left = micros(inner.store_window - ran);
            let local_latest = unix_us().saturating_add(window_left);
            local_latest.saturating_add_signed(inner.clock_offset_us.load(Ordering::SeqCst))
        } else {
            0
        };
        let (Some(key), Some(digest)) = (names.keys.first(), names.digests.first()) else {
            return;
        };
        let tombstone = inner.name("t", digest);
        let Some(sealed) = inner.sealer.seal(key.as_bytes(), plaintext) else {
            return;
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let stored = inner
            .run("set", |mut conn| async move {
                inner
                    .store_script
                    .key(key)
                    .key(&tombstone)
                    .arg(sealed)
                    .arg(ttl_ms)
                    .arg(latest_us)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        match stored {
            Ok(1) => inner.metrics.store("written"),
            Ok(0) => {
                inner.metrics.store("tombstoned");
                tracing::debug!("a purge since the lookup began: its answer is not written back");
            }
            Ok(_) => inner.metrics.store("late"),
            Err(_) => {}
        }
    }

    /// Deletes an entry under every name, forbids writing it back for a while, and announces
    /// the purge to the other replicas. `false` when Redis could not be told: the purge then
    /// stayed local, and is replayed when Redis is back.
    pub async fn purge(&self, names: &EntryNames) -> bool {
        let inner = &*self.inner;
        let send = || {
            inner.run_if(&inner.purges_open, "purge", |mut conn| async move {
                inner
                    .purge_invocation(names)
                    .invoke_async::<String>(&mut conn)
                    .await
            })
        };
        for _ in 0..3 {
            match send().await {
                Ok(_) => return true,
                Err(NotRun::Failed) => break,
                // Queued for replay, unless recovery opened the gate meanwhile (and may have
                // replayed the queue already): then it is sent now.
                Err(NotRun::Down) if !inner.queue_unless_open(names) => return false,
                Err(NotRun::Down) => {}
            }
        }
        inner.queue(names);
        false
    }

    /// Asks the global quota for one partner call. The script books the first slot free before
    /// `deadline`, so a caller waits once, for its own slot, instead of polling.
    pub async fn acquire_call(&self, deadline: Instant) -> QuotaDecision {
        let inner = &*self.inner;
        // A slot that leaves the call no time would only end in a timeout.
        let left = deadline.saturating_duration_since(Instant::now());
        let max_wait_us = micros(left.saturating_sub(MIN_CALL_TIME));
        let booked = inner
            .run("quota", |mut conn| async move {
                inner
                    .quota_script
                    .key(&inner.quota_key)
                    .arg(inner.quota_args.0)
                    .arg(inner.quota_args.1)
                    .arg(max_wait_us)
                    .arg(inner.quota_horizon_us)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        match booked {
            Err(_) => {
                inner.metrics.quota("local");
                QuotaDecision::Unavailable
            }
            Ok(0) => {
                inner.metrics.quota("granted");
                QuotaDecision::Granted
            }
            Ok(wait_us) if wait_us > 0 => {
                inner.metrics.quota("waited");
                tokio::time::sleep(Duration::from_micros(wait_us.unsigned_abs())).await;
                QuotaDecision::Granted
            }
            Ok(_) => {
                inner.metrics.quota("refused");
                QuotaDecision::Refused
            }
        }
    }
}

impl Inner {
    /// Runs one command on a connection of the pool unless the tier is down, within the
    /// command timeout; a lost or silent connection marks the tier down.
    async fn run<'a, T, F, Fut>(&'a self, operation: &'static str, command: F) -> Result<T, NotRun>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>> + 'a,
    {
        self.run_if(&self.up, operation, command).await
    }

    /// [`Self::run`], gated by `open` instead of the tier being up.
    async fn run_if<'a, T, F, Fut>(
        &'a self,
        open: &AtomicBool,
        operation: &'static str,
        command: F,
    ) -> Result<T, NotRun>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>> + 'a,
    {
        if !open.load(Ordering::SeqCst) {
            return Err(NotRun::Down);
        }
        let Some(conn) = self.conn() else {
            return Err(NotRun::Down);
        };
        match timeout(self.command_timeout, command(conn)).await {
            Ok(Ok(value)) => Ok(value),
            // Only a lost or silent connection means Redis is down; a command Redis refused
            // (no permission, out of memory, read-only replica) is counted and logged, or the
            // tier would flap between down and a successful PING.
            Ok(Err(e)) if means_down(&e) => {
                self.mark_down(operation, &e.to_string());
                Err(NotRun::Failed)
            }
            Ok(Err(e)) => {
                self.metrics.error(operation);
                tracing::warn!(operation, error = %e, "Redis refused a shared-tier command");
                Err(NotRun::Failed)
            }
            Err(_) => {
                self.mark_down(operation, "timed out");
                Err(NotRun::Failed)
            }
        }
    }

    fn current_pool(&self) -> Arc<[ConnectionManager]> {
        self.pool
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// One connection of the pool, round robin.
    fn conn(&self) -> Option<ConnectionManager> {
        let pool = self.pool.read().unwrap_or_else(PoisonError::into_inner);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % pool.len().max(1);
        pool.get(i).cloned()
    }

    fn mark_down(&self, operation: &'static str, error: &str) {
        self.metrics.error(operation);
        // Under the queue's lock, as the gate opens and the tier goes up.
        let pending = self.pending();
        self.purges_open.store(false, Ordering::SeqCst);
        drop(pending);
        if self.up.swap(false, Ordering::SeqCst) {
            self.metrics.transition(false);
            tracing::warn!(
                operation,
                error,
                "shared tier down: serving from local state and local limits until Redis answers again"
            );
        }
    }

    /// The Redis name of one of an entry's keys: `v1` for its value, `t` for its tombstone
    /// (named only when a store or a purge needs it, not on every lookup).
    fn name(&self, kind: &str, digest: &[u8; DIGEST]) -> String {
        format!("{}{kind}:{}", self.prefix, URL_SAFE_NO_PAD.encode(digest))
    }

    /// The purge script's call for one entry.
    fn purge_invocation(&self, names: &EntryNames) -> redis::ScriptInvocation<'_> {
        let tombstones: Vec<_> = names.digests.iter().map(|d| self.name("t", d)).collect();
        let mut call = self.purge_script.key(&self.log_key);
        call.key(&names.keys)
            .key(tombstones)
            .arg(self.tombstone_ms)
            .arg(purge::LOG_LEN)
            .arg(names.digests.concat())
            .arg(&self.channel)
            .arg(&self.instance);
        call
    }

    /// Tells Redis of the purges it could not be told of when they were made; `false` if some
    /// are still pending (they are tried again on the next round).
    async fn replay_purges(&self) -> bool {
        let mut pending = std::mem::take(&mut *self.pending());
        if pending.is_empty() {
            return true;
        }
        let total = pending.len();
        let Some(mut conn) = self.conn() else {
            self.keep_pending(pending);
            return false;
        };
        // A pipeline calls scripts by hash only, and a restarted Redis knows none.
        let load = self.purge_script.prepare_invoke();
        let load = timeout(self.command_timeout, load.load_async(&mut conn)).await;
        if !matches!(load, Ok(Ok(_))) {
            self.keep_pending(pending);
            return false;
        }
        let mut dropped = 0;
        while !pending.is_empty() {
            let batch = pending.len().min(REPLAY_BATCH);
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for purge in &pending[..batch] {
                pipe.invoke_script(&self.purge_invocation(&purge.names));
            }
            let sent = timeout(
                self.command_timeout * 4,
                pipe.query_async::<Vec<RedisResult<redis::Value>>>(&mut conn),
            )
            .await;
            let Ok(Ok(results)) = sent else {
                self.keep_pending(pending);
                return false;
            };
            let mut retry = Vec::new();
            for (mut purge, result) in pending.drain(..batch).zip(results) {
                let Err(e) = result else { continue };
                self.metrics.error("purge");
                purge.refusals += 1;
                let give_up = match refusal(&e) {
                    Refusal::ForGood => true,
                    Refusal::Passing => false,
                    Refusal::Unknown => purge.refusals >= MAX_UNKNOWN_REFUSALS,
                };
                if give_up {
                    dropped += 1;
                    tracing::warn!(error = %e, "Redis refuses a purge for good: dropped");
                } else {
                    tracing::debug!(error = %e, "a replayed purge failed: kept for the next round");
                    retry.push(purge);
                }
            }
            if !retry.is_empty() {
                retry.append(&mut pending);
                self.keep_pending(retry);
                return false;
            }
        }
        tracing::info!(
            purges = total - dropped,
            "purges Redis could not be told of when they were made replayed"
        );
        true
    }

    /// Queues a purge for replay.
    fn queue(&self, names: &EntryNames) {
        let mut pending = self.pending();
        self.push_pending(&mut pending, names);
    }

    /// Queues a purge for replay while the gate is shut; `true` (and nothing queued) if it was
    /// opened meanwhile. The gate opens under the same lock, so a purge is either queued before
    /// the replay reads the queue or sent after the gate opened.
    fn queue_unless_open(&self, names: &EntryNames) -> bool {
        let mut pending = self.pending();
        if self.purges_open.load(Ordering::SeqCst) {
            return true;
        }
        self.push_pending(&mut pending, names);
        false
    }

    fn push_pending(&self, pending: &mut Vec<PendingPurge>, names: &EntryNames) {
        if pending.len() >= MAX_PENDING_PURGES {
            pending.remove(0);
            self.overflowed();
        }
        pending.push(PendingPurge {
            names: names.clone(),
            refusals: 0,
        });
    }

    fn overflowed(&self) {
        self.metrics.error("purge_overflow");
        tracing::warn!(
            max = MAX_PENDING_PURGES,
            "too many purges waiting for Redis: the oldest is dropped"
        );
    }

    /// Opens the purge gate (under the queue's lock, see [`Self::queue_unless_open`]).
    fn open_purges(&self) {
        let _pending = self.pending();
        self.purges_open.store(true, Ordering::SeqCst);
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<PendingPurge>> {
        self.pending_purges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts purges not replayed back in front of those made meanwhile.
    fn keep_pending(&self, mut not_replayed: Vec<PendingPurge>) {
        let mut pending = self.pending();
        not_replayed.append(&mut pending);
        let excess = not_replayed.len().saturating_sub(MAX_PENDING_PURGES);
        if excess > 0 {
            not_replayed.drain(..excess);
            self.overflowed();
        }
        *pending = not_replayed;
    }

    /// Marks the tier up, unless purges were made while the last ones were replayed (the next
    /// round replays them first).
    fn mark_up_if_replayed(&self) -> bool {
        let pending = self.pending();
        // A purge that failed during the replay shut the gate: start over.
        if !pending.is_empty() || !self.purges_open.load(Ordering::SeqCst) {
            return false;
        }
        self.missed_heartbeats.store(0, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
        drop(pending);
        self.metrics.transition(true);
        tracing::info!("shared tier up again: using Redis");
        true
    }

    /// Reads Redis's clock (`TIME`) to learn its offset from this host's, which bounds stores
    /// on Redis's own clock. `false` if Redis did not answer within a connect and a command
    /// timeout (a heartbeat is not a request: it can afford to wait).
    async fn sync_clock(&self) -> bool {
        let Some(mut conn) = self.conn() else {
            return false;
        };
        let before = unix_us();
        let time = redis::cmd("TIME");
        let bound = self.connect_timeout + self.command_timeout;
        let answer = timeout(bound, time.query_async::<(u64, u64)>(&mut conn)).await;
        let Ok(Ok((secs, micros))) = answer else {
            return false;
        };
        let after = unix_us();
        let redis_us = secs.saturating_mul(1_000_000).saturating_add(micros);
        let local_us = before / 2 + after / 2;
        let offset = i64::try_from(i128::from(redis_us) - i128::from(local_us)).unwrap_or(0);
        self.clock_offset_us.store(offset, Ordering::SeqCst);
        self.clock_synced.store(true, Ordering::SeqCst);
        true
    }

    /// The up tier's heartbeat: notices a Redis lost while this replica is idle. Two misses in
    /// a row mark the tier down, so one slow answer from a busy Redis does not.
    async fn heartbeat(&self) {
        if self.sync_clock().await {
            self.missed_heartbeats.store(0, Ordering::SeqCst);
        } else if self.missed_heartbeats.fetch_add(1, Ordering::SeqCst) + 1 >= 2 {
            self.missed_heartbeats.store(0, Ordering::SeqCst);
            self.mark_down("heartbeat", "two heartbeats unanswered");
        }
    }

    /// PING on every connection of `pool` at once; `true` if all answered in time.
    async fn ping_pool(&self, pool: &[ConnectionManager]) -> bool {
        // A first connection can take the connect timeout, a live one only the command timeout.
        let bound = self.connect_timeout + self.command_timeout;
        let pings = pool.iter().map(|conn| {
            let mut conn = conn.clone();
            async move {
                let ping = redis::cmd("PING");
                let pong = timeout(bound, ping.query_async::<String>(&mut conn)).await;
                matches!(pong, Ok(Ok(_)))
            }
        });
        join_all(pings).await.into_iter().all(|answered| answered)
    }

    /// Reads the purge log from `from`, inclusive.
    async fn read_log(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        from: LogId,
    ) -> RedisResult<Vec<(LogId, Vec<u8>)>> {
        let raw: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(&self.log_key)
            .arg(from.to_string())
            .arg("+")
            .arg("COUNT")
            .arg(purge::LOG_LEN)
            .query_async(conn)
            .await?;
        Ok(raw
            .into_iter()
            .filter_map(|(id, fields)| {
                // Fields come as [name, value]: the digests are the value.
                Some((LogId::parse(id.as_bytes())?, fields.into_iter().nth(1)?))
            })
            .collect())
    }

    /// Makes up for the purges announced while this replica was not listening, and returns
    /// the newest purge log entry it has now seen. `last`: the newest it had seen before
    /// (`None` on the first subscription, or after one whose log could not be read).
    /// `initial`: the first subscription, made at start-up before anything was cached.
    /// `distrusted`: whether memory was distrusted since the last catch-up (once is enough).
    async fn catch_up(
        &self,
        last: Option<LogId>,
        initial: bool,
        distrusted: &mut bool,
        on_purge: &impl Fn(Purged<'_>),
    ) -> RedisResult<LogId> {
        // A connection of its own: the pool may still hold connections from before the outage
        // that made this resubscription necessary.
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        match last {
            Some(last) => {
                let entries = self.read_log(&mut conn, last).await?;
                match purge::plan(last, &ids(&entries)) {
                    Plan::Apply(from) => {
                        let missed = entries.get(from..).unwrap_or_default();
                        for (_, digests) in missed {
                            apply(digests, on_purge);
                        }
                        if !missed.is_empty() {
                            self.metrics.catch_up("replayed");
                            tracing::info!(
                                purges = missed.len(),
                                "purges announced while the channel was down applied from the log"
                            );
                        }
                        return Ok(entries.last().map_or(last, |(id, _)| *id));
                    }
                    // Trimmed past it, or not the log it was read from (Redis restarted, or
                    // evicted it).
                    Plan::Distrust => self.distrust(
                        distrusted,
                        on_purge,
                        "the purge log no longer holds the last purge seen",
                    ),
                }
            }
            None if !initial => {
                self.distrust(
                    distrusted,
                    on_purge,
                    "no position in the purge log to catch up from",
                );
            }
            None => {}
        }
        self.log_head(&mut conn).await
    }

    /// The newest entry of the purge log. An empty log gets an empty entry first, so that a
    /// replica always holds a position a later log (after a restart) cannot contain.
    async fn log_head(&self, conn: &mut redis::aio::MultiplexedConnection) -> RedisResult<LogId> {
        let head: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XREVRANGE")
            .arg(&self.log_key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut *conn)
            .await?;
        let id = match head.into_iter().next() {
            Some((id, _)) => id,
            None => {
                redis::cmd("XADD")
                    .arg(&self.log_key)
                    .arg("MAXLEN")
                    .arg(purge::LOG_LEN)
                    .arg("*")
                    .arg("d")
                    .arg("")
                    .query_async::<String>(&mut *conn)
                    .await?
            }
        };
        LogId::parse(id.as_bytes()).ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Parse,
                "purge log id",
                "not an entry id".to_owned(),
            ))
        })
    }

    /// Purges may have been missed and cannot be named: nothing held in memory is served as
    /// fresh again.
    fn distrust(&self, distrusted: &mut bool, on_purge: &impl Fn(Purged<'_>), why: &str) {
        if std::mem::replace(distrusted, true) {
            return;
        }
        on_purge(Purged::All);
        self.metrics.catch_up("distrusted");
        tracing::warn!(
            why,
            "purges may have been missed: in-memory entries are no longer served as fresh (they \
             refill from Redis or the partner, and remain a fallback if the partner fails)"
        );
    }
}

/// TCP options of every connection: no Nagle delay on small commands, and a peer that stops
/// answering is given up after about 10 s even when no reset ever arrives.
fn tcp_settings() -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(1));
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    let keepalive = keepalive.with_retries(5);
    let settings = TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    let settings = settings.set_user_timeout(Duration::from_secs(10));
    settings
}

fn new_pool(
    client: &redis::Client,
    config: &ConnectionManagerConfig,
    size: usize,
) -> RedisResult<Arc<[ConnectionManager]>> {
    (0..size.max(1))
        .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
        .collect()
}

/// A server error's code and text, as Redis sent them.
fn code_and_detail(e: &redis::RedisError) -> String {
    format!(
        "{} {}",
        e.code().unwrap_or_default(),
        e.detail().unwrap_or_default()
    )
}

/// How lasting a refusal is.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// It will be refused again whatever the moment: a missing permission.
    ForGood,
    /// It may pass: a fail-over, loading, out of memory, a busy script.
    Passing,
    /// Anything else (a proxy's `ERR`, say): tried a bounded number of times.
    Unknown,
}

/// Errors Redis returns for conditions that pass. Before Redis 7 an error inside a script
/// came back as `ERR Error running script ...` with the real code in its text, so the text is
/// searched, not only the code.
const PASSING: [&str; 8] = [
    "READONLY",
    "MASTERDOWN",
    "LOADING",
    "OOM",
    "BUSY",
    "MISCONF",
    "NOREPLICAS",
    "TRYAGAIN",
];

fn refusal(e: &redis::RedisError) -> Refusal {
    if matches!(e.code(), Some("NOPERM" | "WRONGTYPE")) {
        return Refusal::ForGood;
    }
    let text = code_and_detail(e);
    if PASSING.iter().any(|code| text.contains(code)) {
        Refusal::Passing
    } else {
        Refusal::Unknown
    }
}

/// Whether the node answering can no longer serve the tier: it became a replica (a fail-over
/// left this connection on the old primary), or its primary is gone.
fn node_demoted(e: &redis::RedisError) -> bool {
    let text = code_and_detail(e);
    text.contains("READONLY") || text.contains("MASTERDOWN")
}

/// Whether an error means the connection is gone (rather than a command Redis refused).
fn means_down(e: &redis::RedisError) -> bool {
    node_demoted(e)
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// This host's wall clock in microseconds since the Unix epoch.
fn unix_us() -> u64 {
    micros(crate::clock::unix_now())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn ids(entries: &[(LogId, Vec<u8>)]) -> Vec<LogId> {
    entries.iter().map(|(id, _)| *id).collect()
}

/// Calls `on_purge` for every whole digest of an announcement or log entry.
fn apply(digests: &[u8], on_purge: &impl Fn(Purged<'_>)) {
    for digest in digests.chunks_exact(DIGEST) {
        if let Ok(digest) = <&[u8; DIGEST]>::try_from(digest) {
            on_purge(Purged::Entry(digest));
        }
    }
}

/// Every `recovery_interval`: on an up tier, beats (which also notices a Redis lost while idle)
/// and replays purges a refused or racing command left pending; on a down tier, opens fresh
/// connections and, once every one answers, swaps them in, replays the pending purges (new ones
/// already go to Redis) and marks the tier up.
async fn recover(weak: Weak<Inner>) {
    loop {
        let Some(interval) = weak.upgrade().map(|inner| inner.recovery_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if inner.up.load(Ordering::SeqCst) {
            inner.heartbeat().await;
            if inner.up.load(Ordering::SeqCst) {
                inner.replay_purges().await;
            }
            continue;
        }
        let Ok(pool) = new_pool(&inner.client, &inner.manager_config, inner.pool_size) else {
            continue;
        };
        if !inner.ping_pool(&pool).await {
            continue;
        }
        *inner.pool.write().unwrap_or_else(PoisonError::into_inner) = pool;
        inner.sync_clock().await;
        inner.open_purges();
        // Purges that had already found the gate shut may still be joining the queue.
        for _ in 0..3 {
            if !inner.replay_purges().await || inner.mark_up_if_replayed() {
                break;
            }
        }
    }
}

/// Keeps the purge channel subscribed, resubscribing after any loss, catches up from the purge
/// log on every subscription, and applies every purge announced. `first` hears when the first
/// attempt is over, whatever its outcome.
async fn subscribe(
    weak: Weak<Inner>,
    on_purge: impl Fn(Purged<'_>) + Send + Sync,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let mut was_subscribed = false;
    // The newest purge log entry seen here.
    let mut last: Option<LogId> = None;
    // Memory was distrusted for the current gap in listening: once is enough.
    let mut distrusted = false;
    let mut failed_catch_ups = 0;
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let client = inner.client.clone();
        let channel = inner.channel.clone();
        let instance = inner.instance.clone();
        let (connect_timeout, command_timeout, interval) = (
            inner.connect_timeout,
            inner.command_timeout,
            inner.recovery_interval,
        );
        let metrics = inner.metrics.clone();
        drop(inner);

        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            RedisResult::Ok(pubsub)
        };
        let initial = first.is_some();
        let subscribed = timeout(connect_timeout + command_timeout, subscribed).await;
        let pubsub = match subscribed {
            Ok(Ok(pubsub)) => {
                // After subscribing, so nothing falls between the log and the channel (what is
                // in both is applied twice, which is harmless). Announcements wait meanwhile.
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let budget = connect_timeout + command_timeout * 4;
                let caught = inner.catch_up(last, initial, &mut distrusted, &on_purge);
                match timeout(budget, caught).await {
                    Ok(Ok(newest)) => {
                        last = Some(newest);
                        failed_catch_ups = 0;
                        Some(pubsub)
                    }
                    failure => {
                        let for_good =
                            matches!(&failure, Ok(Err(e)) if refusal(e) == Refusal::ForGood);
                        failed_catch_ups += 1;
                        if !for_good && failed_catch_ups < CATCH_UP_ATTEMPTS {
                            // Redis still loading its data, or failing over: try again shortly
                            // rather than give up what memory holds.
                            None
                        } else {
                            // Listen anyway: what is announced from now on is heard, and what
                            // came before is no longer trusted. `last` stays a lower bound for
                            // the next catch-up.
                            failed_catch_ups = 0;
                            if last.is_some() || !initial {
                                let why = "the purge log could not be read";
                                inner.distrust(&mut distrusted, &on_purge, why);
                            }
                            Some(pubsub)
                        }
                    }
                }
            }
            _ => None,
        };
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
        if let Some(pubsub) = pubsub {
            // Subscribed means caught up (or distrusting what it could not catch up on) and
            // listening; the next loss opens a new gap.
            distrusted = false;
            set_subscribed(&weak, &metrics, true);
            if was_subscribed {
                tracing::info!("purge channel subscribed again");
            }
            was_subscribed = true;
            let (mut sink, mut messages) = pubsub.split();
            let mut ping = tokio::time::interval(interval);
            ping.tick().await;
            loop {
                tokio::select! {
                    message = messages.next() => {
                        let Some(message) = message else { break };
                        let payload = message.get_payload_bytes();
                        let Some(announced) = Announcement::parse(payload, DIGEST) else {
                            continue;
                        };
                        apply(announced.digests, &on_purge);
                        last = last.max(Some(announced.id));
                        if announced.sender != instance.as_bytes() {
                            metrics.purge_received();
                        }
                    }
                    _ = ping.tick() => {
                        // Also notices a Redis that stopped answering without closing the socket.
                        if weak.strong_count() == 0 {
                            return;
                        }
                        let pong = timeout(command_timeout, sink.ping::<redis::Value>()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            break;
                        }
                    }
                }
            }
            set_subscribed(&weak, &metrics, false);
            tracing::warn!(
                "purge channel lost: purges by other replicas reach this one again once it resubscribes"
            );
        }
        tokio::time::sleep(interval).await;
    }
}

fn set_subscribed(weak: &Weak<Inner>, metrics: &SharedTierMetrics, subscribed: bool) {
    if let Some(inner) = weak.upgrade() {
        inner.subscribed.store(subscribed, Ordering::SeqCst);
    }
    metrics.subscribed(subscribed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error Redis would send as `-<line>`.
    fn server_error(line: &str) -> redis::RedisError {
        let value = redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .expect("an error frame parses");
        value.extract_error().expect_err("an error")
    }

    #[test]
    fn refusals_are_told_apart_by_how_long_they_last() {
        assert_eq!(
            refusal(&server_error("NOPERM no permission")),
            Refusal::ForGood
        );
        assert_eq!(
            refusal(&server_error("READONLY You can't write")),
            Refusal::Passing
        );
        assert_eq!(
            refusal(&server_error("LOADING loading the dataset")),
            Refusal::Passing
        );
        assert_eq!(
            refusal(&server_error("OOM command not allowed")),
            Refusal::Passing
        );
        // Before Redis 7, an error inside a script keeps its real code in the text only.
        let nested = server_error(
            "ERR Error running script (call to f_1): @user_script:3: @user_script: 3: \
             -READONLY You can't write against a read only replica.",
        );
        assert_eq!(refusal(&nested), Refusal::Passing);
        assert!(node_demoted(&nested));
        assert_eq!(
            refusal(&server_error("ERR no upstream host")),
            Refusal::Unknown
        );
        assert!(!node_demoted(&server_error("OOM command not allowed")));
    }
}
