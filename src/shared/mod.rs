//! The shared tier: a Redis cache behind each replica's in-memory one, purges announced to every
//! replica, and the partner quota counted across replicas. Optional: without `[redis]` none of
//! this exists.
//!
//! Redis is a helper, never a dependency. Every command is bounded by `redis.command_timeout_ms`;
//! the first failure marks the tier down (a metric and one log line), after which commands are
//! not even tried: lookups go to the partner, the quota falls back to the local limiter, and
//! readiness stays green. A background task pings Redis every `redis.recovery_interval_ms` and
//! marks the tier up again (a metric and one log line) once every connection answers.
//!
//! What reaches Redis is sealed first (see [`seal`]): keys are keyed hashes, values are encrypted
//! and authenticated, and the purge channel carries only hashes.

mod quota;
pub mod seal;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures_util::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisResult;
use secrecy::ExposeSecret;
use tokio::time::{timeout, Instant};

use crate::config::RedisSettings;
use crate::domain::CustomerEmail;
use crate::metrics::SharedTierMetrics;
use seal::Sealer;

/// Length of one index digest, as the purge channel carries them.
pub const DIGEST: usize = 16;

/// The Redis tier of one instance. Cheap to clone.
#[derive(Clone)]
pub struct SharedTier {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conns: Box<[ConnectionManager]>,
    next: AtomicUsize,
    sealer: Sealer,
    prefix: String,
    channel: String,
    quota_key: String,
    quota: redis::Script,
    /// Microseconds between calls, and the burst tolerance.
    quota_args: (u64, u64),
    command_timeout: Duration,
    connect_timeout: Duration,
    recovery_interval: Duration,
    up: AtomicBool,
    subscribed: AtomicBool,
    /// Purges Redis could not be told of: replayed before the tier counts as up again, so an
    /// entry purged during an outage is not served from Redis afterwards.
    pending_purges: Mutex<Vec<EntryNames>>,
    metrics: SharedTierMetrics,
}

/// Bound on purges remembered during an outage (the oldest are dropped beyond it).
const MAX_PENDING_PURGES: usize = 10_000;

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

impl SharedTier {
    /// Sets up the connections (lazily: nothing is dialled here) and the sealing keys.
    pub fn new(
        settings: &RedisSettings,
        per_s: u32,
        metrics: SharedTierMetrics,
    ) -> RedisResult<Self> {
        let client = redis::Client::open(settings.url.expose_secret())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.command_timeout))
            // Reconnection is paced by the recovery task, not by retries inside a command.
            .set_number_of_retries(0);
        let conns = (0..settings.pool_size)
            .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
            .collect::<RedisResult<Box<[_]>>>()?;
        let prefix = settings.key_prefix.clone();
        let (interval_us, tolerance_us) = quota::gcra_args(per_s);
        let script = redis::Script::new(quota::GCRA_LUA);
        let tier = Self {
            inner: Arc::new(Inner {
                client,
                conns,
                next: AtomicUsize::new(0),
                sealer: Sealer::new(&settings.encryption_keys),
                channel: format!("{prefix}purge"),
                // The rate is part of the key: replicas that disagree on it during a rollout
                // keep separate budgets instead of misreading each other's.
                quota_key: format!("{prefix}quota:{interval_us}:{tolerance_us}"),
                quota: script,
                quota_args: (interval_us, tolerance_us),
                prefix,
                command_timeout: settings.command_timeout,
                connect_timeout: settings.connect_timeout,
                recovery_interval: settings.recovery_interval,
                up: AtomicBool::new(false),
                subscribed: AtomicBool::new(false),
                pending_purges: Mutex::new(Vec::new()),
                metrics,
            }),
        };
        Ok(tier)
    }

    /// Connects (bounded by `redis.connect_timeout_ms`), then starts the recovery task and the
    /// purge subscriber, which calls `on_purge` with each index digest another replica purged.
    /// Redis being unreachable here is logged, not fatal: the tier starts down and recovers.
    pub async fn start(&self, on_purge: impl Fn(&[u8; DIGEST]) + Send + Sync + 'static) {
        let up = self.inner.ping_all().await;
        self.inner.up.store(up, Ordering::SeqCst);
        self.inner.metrics.set_up(up);
        if up {
            tracing::info!(
                connections = self.inner.conns.len(),
                "shared tier connected"
            );
        } else {
            tracing::warn!(
                "shared tier unreachable at start-up: serving from local state until Redis answers"
            );
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(recover(weak.clone()));
        tokio::spawn(subscribe(weak, on_purge));
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
        let keys = digests
            .iter()
            .map(|d| format!("{}v1:{}", inner.prefix, URL_SAFE_NO_PAD.encode(d)))
            .collect();
        EntryNames { digests, keys }
    }

    /// Reads an entry: the first name that holds a value this instance can open. `None` on a
    /// miss, an unreadable value, or Redis unavailable.
    pub async fn fetch(&self, names: &EntryNames) -> Option<Vec<u8>> {
        let inner = &*self.inner;
        let metrics = &inner.metrics;
        let mut conn = self.conn();
        let Some(values) = self
            .run("get", async {
                redis::cmd("MGET")
                    .arg(&names.keys)
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                    .await
            })
            .await
        else {
            metrics.lookup(if self.is_up() { "error" } else { "skipped" });
            return None;
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

    /// Writes an entry under the newest secret, to live `ttl` in Redis.
    pub async fn store(&self, names: &EntryNames, plaintext: &[u8], ttl: Duration) {
        let inner = &*self.inner;
        let Some(key) = names.keys.first() else {
            return;
        };
        let Some(sealed) = inner.sealer.seal(key.as_bytes(), plaintext) else {
            return;
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut conn = self.conn();
        self.run("set", async {
            redis::cmd("SET")
                .arg(key)
                .arg(sealed)
                .arg("PX")
                .arg(ttl_ms)
                .query_async::<()>(&mut conn)
                .await
        })
        .await;
    }

    /// Deletes an entry under every name and announces the purge to the other replicas.
    /// `false` when Redis could not be told: the purge then stayed local.
    pub async fn purge(&self, names: &EntryNames) -> bool {
        let mut conn = self.conn();
        let mut pipe = redis::pipe();
        add_purge(&mut pipe, &self.inner.channel, names);
        let told = self
            .run("purge", pipe.query_async::<()>(&mut conn))
            .await
            .is_some();
        if !told {
            let mut pending = self
                .inner
                .pending_purges
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if pending.len() >= MAX_PENDING_PURGES {
                pending.remove(0);
            }
            pending.push(names.clone());
        }
        told
    }

    /// Asks the global quota for one partner call, waiting for a slot up to `deadline`.
    pub async fn acquire_call(&self, deadline: Instant) -> QuotaDecision {
        let inner = &*self.inner;
        let mut waited = false;
        loop {
            let mut conn = self.conn();
            let wait_us = self
                .run("quota", async {
                    inner
                        .quota
                        .key(&inner.quota_key)
                        .arg(inner.quota_args.0)
                        .arg(inner.quota_args.1)
                        .invoke_async::<i64>(&mut conn)
                        .await
                })
                .await;
            let Some(wait_us) = wait_us else {
                inner.metrics.quota("local");
                return QuotaDecision::Unavailable;
            };
            if wait_us <= 0 {
                inner
                    .metrics
                    .quota(if waited { "waited" } else { "granted" });
                return QuotaDecision::Granted;
            }
            let wait = Duration::from_micros(wait_us.unsigned_abs());
            if Instant::now() + wait > deadline {
                inner.metrics.quota("refused");
                return QuotaDecision::Refused;
            }
            waited = true;
            tokio::time::sleep(wait).await;
        }
    }

    /// One connection of the pool, round robin.
    fn conn(&self) -> ConnectionManager {
        let inner = &*self.inner;
        let i = inner.next.fetch_add(1, Ordering::Relaxed) % inner.conns.len().max(1);
        inner.conns[i].clone()
    }

    /// Runs one command unless the tier is down, within the command timeout; a failure marks
    /// the tier down.
    async fn run<T>(
        &self,
        operation: &'static str,
        command: impl Future<Output = RedisResult<T>>,
    ) -> Option<T> {
        if !self.is_up() {
            return None;
        }
        match timeout(self.inner.command_timeout, command).await {
            Ok(Ok(value)) => Some(value),
            // Only a lost or silent connection means Redis is down; a command Redis refused
            // (no permission, out of memory, read-only replica) is counted and logged, or the
            // tier would flap between down and a successful PING.
            Ok(Err(e))
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.is_unrecoverable_error() =>
            {
                self.inner.mark_down(operation, &e.to_string());
                None
            }
            Ok(Err(e)) => {
                self.inner.metrics.error(operation);
                tracing::warn!(operation, error = %e, "Redis refused a shared-tier command");
                None
            }
            Err(_) => {
                self.inner.mark_down(operation, "timed out");
                None
            }
        }
    }
}

impl Inner {
    fn mark_down(&self, operation: &'static str, error: &str) {
        self.metrics.error(operation);
        if self.up.swap(false, Ordering::SeqCst) {
            self.metrics.transition(false);
            tracing::warn!(
                operation,
                error,
                "shared tier down: serving from local state and local limits until Redis answers again"
            );
        }
    }

    /// Tells Redis of the purges made while it was down; `false` if it could not be told.
    async fn replay_purges(&self) -> bool {
        let pending = std::mem::take(
            &mut *self
                .pending_purges
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if pending.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        for names in &pending {
            add_purge(&mut pipe, &self.channel, names);
        }
        let Some(conn) = self.conns.first() else {
            return false;
        };
        let mut conn = conn.clone();
        let sent = timeout(self.command_timeout * 4, pipe.query_async::<()>(&mut conn)).await;
        if matches!(sent, Ok(Ok(_))) {
            tracing::info!(
                purges = pending.len(),
                "purges made while the shared tier was down replayed"
            );
            true
        } else {
            self.pending_purges
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(pending);
            false
        }
    }

    /// PING on every connection; `true` if all answered in time.
    async fn ping_all(&self) -> bool {
        // A first connection can take the connect timeout, a live one only the command timeout.
        let bound = self.connect_timeout + self.command_timeout;
        for conn in self.conns.iter() {
            let mut conn = conn.clone();
            let pong = timeout(bound, redis::cmd("PING").query_async::<String>(&mut conn)).await;
            if !matches!(pong, Ok(Ok(_))) {
                return false;
            }
        }
        true
    }
}

/// Pings a down tier every `recovery_interval` and marks it up when every connection answers.
async fn recover(weak: Weak<Inner>) {
    loop {
        let Some(interval) = weak.upgrade().map(|inner| inner.recovery_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if !inner.up.load(Ordering::SeqCst) && inner.ping_all().await && inner.replay_purges().await
        {
            inner.up.store(true, Ordering::SeqCst);
            inner.metrics.transition(true);
            tracing::info!("shared tier up again: using Redis");
        }
    }
}

/// Keeps the purge channel subscribed, resubscribing after any loss, and applies every purge
/// another replica announces.
async fn subscribe(weak: Weak<Inner>, on_purge: impl Fn(&[u8; DIGEST]) + Send + Sync) {
    let mut was_subscribed = false;
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let client = inner.client.clone();
        let channel = inner.channel.clone();
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
        if let Ok(Ok(pubsub)) = timeout(connect_timeout + command_timeout, subscribed).await {
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
                        // Whole digests only: anything else on the channel is not ours.
                        if payload.is_empty() || payload.len() % DIGEST != 0 {
                            continue;
                        }
                        for digest in payload.chunks_exact(DIGEST) {
                            if let Ok(digest) = <&[u8; DIGEST]>::try_from(digest) {
                                on_purge(digest);
                            }
                        }
                        metrics.purge_received();
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

/// Adds the `DEL` of every name of an entry, then the announcement of its digests.
fn add_purge(pipe: &mut redis::Pipeline, channel: &str, names: &EntryNames) {
    pipe.cmd("DEL")
        .arg(&names.keys)
        .ignore()
        .cmd("PUBLISH")
        .arg(channel)
        .arg(names.digests.concat())
        .ignore();
}
