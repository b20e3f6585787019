//! The credentials cache: moka storage, single-flight partner lookups, and the freshness policy.
//!
//! - Entries are keyed by a keyed hash of the normalized e-mail ([`CacheKey`]); the address itself
//!   is never stored as a key.
//! - Found customers are stored pre-serialized (`Bytes`), so a hit is a reference-count bump.
//! - Freshness is judged from the entry's own store time against an injectable [`Clock`]; moka
//!   only reclaims memory, keeping every entry for the longest TTL plus the longest stale window.
//! - Misses for one key share one partner call. The call runs in its own task and completes for
//!   every waiter even when the caller that started it goes away.
//! - With a [`SharedTier`], a miss asks Redis before the partner, a partner answer is written to
//!   both tiers, and a purge reaches every replica. The in-memory key is then the entry's index
//!   under the newest shared secret, so a purge announced by its index finds it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use moka::sync::Cache;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::Instrument;

pub use crate::clock::Clock;
use crate::config::CacheSettings;
use crate::domain::CustomerEmail;
use crate::partner::{PartnerAnswer, PartnerError, SkypostalClient};
use crate::shared::{EntryNames, Purged, SharedTier};
use crate::telemetry::RequestId;

/// Longest freshness for which hit `Cache-Status` values are prepared at start-up.
const PREPARED_HIT_TTL_S: u64 = 3600;

/// A keyed hash of a normalized e-mail: 128 bits, so collisions are out of reach.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CacheKey([u8; 16]);

/// A cached partner answer.
#[derive(Clone, Debug)]
pub enum CachedAnswer {
    /// The serialized [`crate::domain::Credentials`] record.
    Found(Bytes),
    /// The partner knows no such customer.
    NotFound,
}

/// One cache entry in a single allocation: a 16-byte header (milliseconds on the cache clock
/// when stored, seconds of freshness, found or not, and the trust epoch it was cached under)
/// followed by the serialized record.
///
/// One allocation rather than a struct pointing at a body: at a million entries the difference
/// is about a hundred megabytes.
#[derive(Clone)]
pub struct Entry(Bytes);

const HEADER: usize = 16;
/// Offset of the trust epoch in the header: its low 24 bits, the last three bytes.
const EPOCH: usize = 13;
const EPOCH_BITS: u32 = 0xFF_FFFF;
const FOUND: u8 = 1;

impl Entry {
    /// An entry read back from the shared tier, cached under `epoch`; `None` if the bytes are
    /// not an entry.
    fn from_shared(mut bytes: Vec<u8>, epoch: u32) -> Option<Self> {
        if bytes.len() < HEADER || !matches!(bytes[12], 0 | FOUND) {
            return None;
        }
        bytes[EPOCH..HEADER].copy_from_slice(&epoch_bytes(epoch));
        Some(Self(Bytes::from(bytes)))
    }

    /// The trust epoch the entry was cached under (see [`Inner::epoch`]).
    fn epoch(&self) -> u32 {
        let [a, b, c] = self.word(EPOCH);
        u32::from_le_bytes([a, b, c, 0])
    }

    fn fresh_for(&self) -> Duration {
        Duration::from_secs(u32::from_le_bytes(self.word(8)).into())
    }

    fn new(stored_at_ms: u64, fresh_for: Duration, body: Option<&[u8]>, epoch: u32) -> Self {
        let found = body.is_some();
        let body = body.unwrap_or_default();
        let mut bytes = Vec::with_capacity(HEADER + body.len());
        bytes.extend_from_slice(&stored_at_ms.to_le_bytes());
        let fresh_s = u32::try_from(fresh_for.as_secs()).unwrap_or(u32::MAX);
        bytes.extend_from_slice(&fresh_s.to_le_bytes());
        bytes.push(if found { FOUND } else { 0 });
        bytes.extend_from_slice(&epoch_bytes(epoch));
        bytes.extend_from_slice(body);
        Self(Bytes::from(bytes))
    }

    /// The answer: the record's bytes (shared, not copied) or "not found".
    pub fn answer(&self) -> CachedAnswer {
        match self.0.get(12) {
            Some(&FOUND) => CachedAnswer::Found(self.0.slice(HEADER..)),
            _ => CachedAnswer::NotFound,
        }
    }

    fn word<const N: usize>(&self, at: usize) -> [u8; N] {
        self.0
            .get(at..at + N)
            .and_then(|b| b.try_into().ok())
            .unwrap_or([0; N])
    }

    /// `Ok(time left)` while fresh, `Err(time past expiry)` after.
    fn freshness(&self, now_ms: u64) -> Result<Duration, Duration> {
        let stored_at_ms = u64::from_le_bytes(self.word(0));
        let fresh_for = self.fresh_for();
        let age = Duration::from_millis(now_ms.saturating_sub(stored_at_ms));
        if age < fresh_for {
            Ok(fresh_for - age)
        } else {
            Err(age - fresh_for)
        }
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The record holds a customer key: never in a debug string.
        f.debug_struct("Entry")
            .field("found", &matches!(self.answer(), CachedAnswer::Found(_)))
            .finish_non_exhaustive()
    }
}

/// How a lookup was answered, as `Cache-Status` (RFC 9211) reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// A fresh entry, with whole seconds of freshness left.
    Hit {
        /// Seconds left.
        ttl_s: u64,
    },
    /// A miss whose partner answer was stored.
    Stored,
    /// A miss here answered by a fresh entry of the shared tier (another replica's lookup).
    SharedHit {
        /// Seconds left.
        ttl_s: u64,
    },
    /// A miss that joined another caller's in-flight lookup.
    Collapsed,
    /// The caller sent `Cache-Control: no-cache`; the fresh answer was stored.
    Forced,
    /// A stale entry served at once while one background refresh runs.
    StaleWhileRevalidate {
        /// Seconds past expiry.
        past_s: u64,
    },
    /// A stale entry served because the partner failed.
    StaleIfError {
        /// The partner's HTTP status, if it answered.
        fwd_status: Option<u16>,
        /// Seconds past expiry.
        past_s: u64,
    },
    /// The partner failed and nothing could be served.
    Failed {
        /// The partner's HTTP status, if it answered.
        fwd_status: Option<u16>,
    },
}

impl CacheStatus {
    /// The `Cache-Status` header value.
    pub fn header_value(self) -> HeaderValue {
        const NAME: &str = "skypostal-proxy";
        let text = match self {
            Self::Hit { ttl_s } => format!("{NAME}; hit; ttl={ttl_s}"),
            Self::Stored => return HeaderValue::from_static("skypostal-proxy; fwd=miss; stored"),
            // RFC 9211 lists caches from the origin's side: the shared tier first.
            Self::SharedHit { ttl_s } => {
                format!("{NAME}-shared; hit; ttl={ttl_s}, {NAME}; fwd=miss; stored")
            }
            Self::Collapsed => {
                return HeaderValue::from_static("skypostal-proxy; fwd=miss; collapsed")
            }
            Self::Forced => {
                return HeaderValue::from_static("skypostal-proxy; fwd=request; stored")
            }
            Self::StaleWhileRevalidate { past_s } => {
                format!("{NAME}; hit; ttl=-{past_s}; detail=stale-while-revalidate")
            }
            Self::StaleIfError { fwd_status, past_s } => format!(
                "{NAME}; fwd=stale;{} ttl=-{past_s}; detail=stale-if-error",
                fwd_status.map_or(String::new(), |s| format!(" fwd-status={s};"))
            ),
            Self::Failed { fwd_status: None } => {
                return HeaderValue::from_static("skypostal-proxy; fwd=miss")
            }
            Self::Failed {
                fwd_status: Some(s),
            } => format!("{NAME}; fwd=miss; fwd-status={s}"),
        };
        // Only digits and fixed ASCII go into the text.
        HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(NAME))
    }
}

/// The result of [`CredentialsCache::get`].
#[derive(Debug)]
pub struct Lookup {
    /// The answer served, or why there is none.
    pub result: Result<Entry, PartnerError>,
    /// How it was served.
    pub status: CacheStatus,
}

/// Where a lookup's answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Partner,
    Shared,
}

type Fetched = Result<(Entry, Origin), PartnerError>;

/// The cache in front of the partner. Cheap to clone.
#[derive(Clone)]
pub struct CredentialsCache {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Cache<CacheKey, Entry>,
    /// Lookups running, with the key's generation when each began.
    inflight: Mutex<HashMap<CacheKey, (u64, Pending)>>,
    partner: SkypostalClient,
    clock: Clock,
    key_secret: [u8; 32],
    shared: Option<SharedTier>,
    /// The longest stale window: how long past freshness an entry is kept.
    stale_window: Duration,
    ttl: Duration,
    negative_ttl: Duration,
    stale_if_error: Duration,
    stale_while_revalidate: Duration,
    /// `Cache-Status` of a hit with `i` seconds left, so a hit formats nothing.
    hit_headers: Box<[HeaderValue]>,
    /// Purges so far; a lookup stores its answer only if none touched its key while it ran.
    generations: Generations,
    /// Entries cached under an earlier epoch are not served as fresh (nor while revalidating):
    /// purges may have been missed that cannot be named. They remain a stale-if-error fallback.
    epoch: AtomicU32,
}

impl Inner {
    /// Caches an answer unless the key was purged since its lookup began (at `generation`).
    /// Checked again after the insert: a purge landing in between would otherwise leave the
    /// answer in place for its whole lifetime.
    fn insert_unless_purged(&self, key: CacheKey, entry: &Entry, generation: u64) -> bool {
        if self.generations.of(&key) != generation {
            return false;
        }
        self.entries.insert(key, entry.clone());
        if self.generations.of(&key) != generation {
            self.entries.invalidate(&key);
            return false;
        }
        true
    }
}

/// Purge counters by slot of the key space, so that a purge holds back only the lookups of
/// keys in its slot (one in [`SLOTS`]), not every lookup in flight.
struct Generations {
    slots: Box<[AtomicU64]>,
    /// Purges of everything.
    all: AtomicU64,
}

/// Slots of [`Generations`]: 8 KiB of counters.
const SLOTS: usize = 1024;

impl Generations {
    fn new() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            all: AtomicU64::new(0),
        }
    }

    fn slot(&self, key: &CacheKey) -> &AtomicU64 {
        // Keys are uniform hashes: their first bytes spread evenly.
        let i = usize::from(u16::from_le_bytes([key.0[0], key.0[1]])) % SLOTS;
        &self.slots[i]
    }

    /// The key's generation: it changes whenever the key, or everything, is purged.
    fn of(&self, key: &CacheKey) -> u64 {
        // Both only grow, so the sum changes whenever either does.
        self.all
            .load(Ordering::SeqCst)
            .wrapping_add(self.slot(key).load(Ordering::SeqCst))
    }

    fn bump(&self, key: &CacheKey) {
        self.slot(key).fetch_add(1, Ordering::SeqCst);
    }

    fn bump_all(&self) {
        self.all.fetch_add(1, Ordering::SeqCst);
    }
}

/// Where the waiters of a running lookup get its answer.
type Pending = watch::Receiver<Option<Fetched>>;

/// Removes a lookup from the in-flight map when dropped (unless a newer one replaced it).
struct InflightGuard<'a> {
    cache: &'a CredentialsCache,
    key: CacheKey,
    generation: u64,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut inflight = self
            .cache
            .inner
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if inflight.get(&self.key).map(|(g, _)| *g) == Some(self.generation) {
            inflight.remove(&self.key);
        }
    }
}

/// How a caller takes part in a lookup for a key.
enum Role {
    /// Started the partner call.
    Leader(watch::Receiver<Option<Fetched>>),
    /// Joined a call already running.
    Follower(watch::Receiver<Option<Fetched>>),
    /// A fresh entry appeared meanwhile, with its freshness left.
    Fresh(Entry, Duration),
}

impl CredentialsCache {
    /// Builds the cache in front of `partner`, and of `shared` when there is a shared tier.
    pub fn new(
        settings: &CacheSettings,
        partner: SkypostalClient,
        clock: Clock,
        shared: Option<SharedTier>,
    ) -> Self {
        let secs = Duration::from_secs;
        let longest_ttl = settings
            .ttl_s
            .max(settings.negative_ttl_s)
            .min(PREPARED_HIT_TTL_S);
        let stale_window = secs(
            settings
                .stale_if_error_s
                .max(settings.stale_while_revalidate_s),
        );
        let keep_for = secs(settings.ttl_s.max(settings.negative_ttl_s)) + stale_window;
        let hit_headers = (0..=longest_ttl)
            .map(|ttl_s| CacheStatus::Hit { ttl_s }.header_value())
            .collect();
        Self {
            inner: Arc::new(Inner {
                entries: Cache::builder()
                    .max_capacity(settings.max_entries)
                    // Sized for the first burst of misses, not for the bound: idle memory stays small.
                    .initial_capacity(settings.max_entries.min(1 << 14) as usize)
                    // One lifetime for all entries, the longest any needs: freshness is judged
                    // from the entry itself, and a per-entry expiry made every read slower.
                    .time_to_live(keep_for)
                    .build(),
                inflight: Mutex::new(HashMap::new()),
                partner,
                clock,
                key_secret: rand::random(),
                shared,
                stale_window,
                ttl: secs(settings.ttl_s),
                negative_ttl: secs(settings.negative_ttl_s),
                stale_if_error: secs(settings.stale_if_error_s),
                stale_while_revalidate: secs(settings.stale_while_revalidate_s),
                hit_headers,
                generations: Generations::new(),
                epoch: AtomicU32::new(0),
            }),
        }
    }

    /// The cache key of an address.
    pub fn key(&self, email: &CustomerEmail) -> CacheKey {
        if let Some(shared) = &self.inner.shared {
            return CacheKey(shared.cache_digest(email));
        }
        let digest = Sha256::new()
            .chain_update(self.inner.key_secret)
            .chain_update(email.as_str().as_bytes())
            .finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        CacheKey(key)
    }

    /// Answers from the cache or the partner. `force` skips the cached answer (the caller sent
    /// `Cache-Control: no-cache`); the lookup is still shared with concurrent ones. `request_id`
    /// labels the logs of a partner lookup this call starts.
    pub async fn get(&self, email: &CustomerEmail, force: bool, request_id: &RequestId) -> Lookup {
        let key = self.key(email);
        let cached = self.inner.entries.get(&key);
        let now = self.inner.clock.now_ms();

        if let (Some(entry), false) = (cached.as_ref().filter(|e| self.trusted(e)), force) {
            match entry.freshness(now) {
                Ok(left) => {
                    return Lookup {
                        result: Ok(entry.clone()),
                        status: CacheStatus::Hit {
                            ttl_s: left.as_secs(),
                        },
                    }
                }
                Err(past) if past < self.inner.stale_while_revalidate => {
                    // One background refresh: a running lookup for this key is joined, not repeated.
                    drop(self.join_or_start(key, email, false, request_id));
                    return Lookup {
                        result: Ok(entry.clone()),
                        status: CacheStatus::StaleWhileRevalidate {
                            past_s: stale_secs(past),
                        },
                    };
                }
                Err(_) => {}
            }
        }

        let (fetched, leader) = match self.join_or_start(key, email, force, request_id) {
            Role::Fresh(entry, left) => {
                return Lookup {
                    result: Ok(entry),
                    status: CacheStatus::Hit {
                        ttl_s: left.as_secs(),
                    },
                }
            }
            Role::Leader(rx) => (wait(rx).await, true),
            Role::Follower(rx) => (wait(rx).await, false),
        };

        match fetched {
            Ok((entry, origin)) => Lookup {
                status: match (leader, force, origin) {
                    (false, _, _) => CacheStatus::Collapsed,
                    (true, _, Origin::Shared) => CacheStatus::SharedHit {
                        ttl_s: entry
                            .freshness(self.inner.clock.now_ms())
                            .map_or(0, |left| left.as_secs()),
                    },
                    (true, false, Origin::Partner) => CacheStatus::Stored,
                    (true, true, Origin::Partner) => CacheStatus::Forced,
                },
                result: Ok(entry),
            },
            Err(error) => {
                let fwd_status = error.fwd_status();
                // The lookup may have found a stale entry in the shared tier and kept it here.
                let cached = cached.or_else(|| self.inner.entries.get(&key));
                let stale = cached.and_then(|entry| {
                    let past = match entry.freshness(self.inner.clock.now_ms()) {
                        Err(past) => past,
                        // Fresh by age but no longer trusted: a fallback like a stale one.
                        Ok(_) if !self.trusted(&entry) => Duration::ZERO,
                        Ok(_) => return None,
                    };
                    (past < self.inner.stale_if_error).then_some((entry, past))
                });
                match stale {
                    Some((entry, past)) => Lookup {
                        result: Ok(entry),
                        status: CacheStatus::StaleIfError {
                            fwd_status,
                            past_s: stale_secs(past),
                        },
                    },
                    None => Lookup {
                        result: Err(error),
                        status: CacheStatus::Failed { fwd_status },
                    },
                }
            }
        }
    }

    /// The `Cache-Status` value of a lookup's status.
    pub fn status_header(&self, status: CacheStatus) -> HeaderValue {
        match status {
            CacheStatus::Hit { ttl_s } => match self.inner.hit_headers.get(ttl_s as usize) {
                Some(prepared) => prepared.clone(),
                None => status.header_value(),
            },
            other => other.header_value(),
        }
    }

    /// Drops the cached answer for an address, if any. A lookup running meanwhile does not
    /// store its answer, so the purge cannot be undone by a call that started before it.
    pub fn invalidate(&self, email: &CustomerEmail) {
        self.invalidate_key(self.key(email));
    }

    /// Drops the answer here and, with a shared tier, from Redis and from every other replica.
    /// `false` when a shared tier exists but could not be told: the purge then stayed local.
    pub async fn purge(&self, email: &CustomerEmail) -> bool {
        let key = self.key(email);
        self.invalidate_key(key);
        match &self.inner.shared {
            Some(shared) => {
                let told = shared.purge(&shared.names(email)).await;
                // A lookup between the first invalidation and the DEL may have read the old
                // entry back from Redis.
                self.invalidate_key(key);
                told
            }
            None => true,
        }
    }

    /// What applies the purges other replicas announce (by the entry's index digest).
    pub fn purge_listener(&self) -> impl Fn(Purged<'_>) + Send + Sync + 'static {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        move |purged| {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let cache = CredentialsCache { inner };
            match purged {
                Purged::Entry(digest) => cache.invalidate_key(CacheKey(*digest)),
                Purged::All => {
                    cache.inner.generations.bump_all();
                    cache.inner.epoch.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    /// Whether an entry was cached under the current trust epoch.
    fn trusted(&self, entry: &Entry) -> bool {
        entry.epoch() == self.inner.epoch.load(Ordering::SeqCst) & EPOCH_BITS
    }

    fn invalidate_key(&self, key: CacheKey) {
        self.inner.generations.bump(&key);
        self.inner.entries.invalidate(&key);
    }

    /// The shared tier, when configured.
    pub fn shared(&self) -> Option<&SharedTier> {
        self.inner.shared.as_ref()
    }

    /// Number of cached answers (runs moka's pending maintenance first, so it is current).
    pub fn entry_count(&self) -> u64 {
        self.inner.entries.run_pending_tasks();
        self.inner.entries.entry_count()
    }

    /// The partner client behind the cache.
    pub fn partner(&self) -> &SkypostalClient {
        &self.inner.partner
    }

    fn join_or_start(
        &self,
        key: CacheKey,
        email: &CustomerEmail,
        force: bool,
        request_id: &RequestId,
    ) -> Role {
        let inner = &self.inner;
        let mut inflight = inner
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let generation = inner.generations.of(&key);
        // A lookup that began before a purge of this key may bring back what was purged: a
        // request made after the purge starts its own.
        if let Some((_, rx)) = inflight.get(&key).filter(|(g, _)| *g == generation) {
            return Role::Follower(rx.clone());
        }
        // A lookup that finished between our cache read and this lock stored its answer before
        // leaving the map: look again rather than call the partner twice.
        if !force {
            if let Some(entry) = inner.entries.get(&key).filter(|e| self.trusted(e)) {
                if let Ok(left) = entry.freshness(inner.clock.now_ms()) {
                    return Role::Fresh(entry, left);
                }
            }
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(key, (generation, rx.clone()));
        drop(inflight);

        let this = self.clone();
        let email = email.clone();
        let request_id = request_id.clone();
        // Debug level: an enabled span costs microseconds per miss; the lookup's warnings carry
        // the request id and masked e-mail themselves.
        let span = tracing::debug_span!("lookup", %request_id, %email);
        let started = Instant::now();
        tokio::spawn(
            async move {
                // Leaves the in-flight map however the task ends, a panic included: a key left
                // behind would turn every later miss for it into a failure.
                let guard = InflightGuard {
                    cache: &this,
                    key,
                    generation,
                };
                let names = this.inner.shared.as_ref().map(|s| s.names(&email));
                let fetched = this
                    .fetch(&email, key, names.as_ref(), force, generation, &request_id)
                    .await;
                if let Ok((entry, origin)) = &fetched {
                    // A purge that landed during the call may have been meant for this answer.
                    if this.inner.insert_unless_purged(key, entry, generation) {
                        if let (Some(shared), Some(names), Origin::Partner) =
                            (&this.inner.shared, &names, origin)
                        {
                            // Before answering, so a replica asked next finds it.
                            let ttl = entry.fresh_for() + this.inner.stale_window;
                            shared.store(names, &entry.0, ttl, started).await;
                        }
                    }
                }
                drop(guard);
                // Nobody listening is fine: an abandoned lookup still fills the cache.
                let _ = tx.send(Some(fetched));
            }
            .instrument(span),
        );
        Role::Leader(rx)
    }

    /// One lookup: the shared tier first (unless `force`), then the partner, as a cache entry.
    async fn fetch(
        &self,
        email: &CustomerEmail,
        key: CacheKey,
        names: Option<&EntryNames>,
        force: bool,
        generation: u64,
        request_id: &RequestId,
    ) -> Fetched {
        let inner = &self.inner;
        if let (Some(shared), Some(names), false) = (&inner.shared, names, force) {
            let epoch = inner.epoch.load(Ordering::SeqCst);
            let fetched = shared.fetch(names).await;
            if let Some(entry) = fetched.and_then(|bytes| Entry::from_shared(bytes, epoch)) {
                let fresh = entry.freshness(inner.clock.now_ms()).is_ok();
                shared.record_hit(fresh);
                if fresh {
                    return Ok((entry, Origin::Shared));
                }
                // Stale: kept here as the stale-if-error answer should the partner fail.
                if !inner.entries.contains_key(&key) {
                    inner.insert_unless_purged(key, &entry, generation);
                }
            }
        }
        let started = Instant::now();
        let answer = inner.partner.lookup(email).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let (body, fresh_for) = match answer {
            Ok(PartnerAnswer::Found(credentials)) => {
                tracing::debug!(elapsed_ms, "partner found the customer");
                let body =
                    serde_json::to_vec(&credentials).map_err(|e| PartnerError::Unreadable {
                        reason: format!("record could not be encoded ({:?})", e.classify()),
                    })?;
                (Some(body), inner.ttl)
            }
            Ok(PartnerAnswer::NotFound { fields }) => {
                match fields.as_ref().and_then(|f| f.description.as_deref()) {
                    Some(description) => {
                        tracing::warn!(%request_id, %email, elapsed_ms, description, "partner knows no such customer")
                    }
                    None => tracing::debug!(elapsed_ms, "partner knows no such customer"),
                }
                (None, inner.negative_ttl)
            }
            Err(error) => {
                match &error {
                    PartnerError::AccessDenied { .. } => {
                        tracing::error!(%request_id, %email, elapsed_ms, %error, "partner refused our credentials: check upstream.user_code and upstream.app_key")
                    }
                    _ => {
                        tracing::warn!(%request_id, %email, elapsed_ms, %error, "partner lookup failed")
                    }
                }
                return Err(error);
            }
        };
        Ok((
            Entry::new(
                inner.clock.now_ms(),
                fresh_for,
                body.as_deref(),
                inner.epoch.load(Ordering::SeqCst),
            ),
            Origin::Partner,
        ))
    }
}

/// The low 24 bits of an epoch, as the entry header holds them.
fn epoch_bytes(epoch: u32) -> [u8; 3] {
    let [a, b, c, _] = (epoch & EPOCH_BITS).to_le_bytes();
    [a, b, c]
}

async fn wait(mut rx: watch::Receiver<Option<Fetched>>) -> Fetched {
    match rx.wait_for(Option::is_some).await {
        Ok(value) => value.clone().unwrap_or_else(|| Err(lookup_lost())),
        Err(_) => Err(lookup_lost()),
    }
}

fn lookup_lost() -> PartnerError {
    PartnerError::Transport("the lookup task ended without an answer".to_owned())
}

/// Whole seconds past expiry for `ttl=-N`: at least 1, since the entry is stale.
fn stale_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_keeps_its_answer_and_freshness_in_one_buffer() {
        let found = Entry::new(1_000, Duration::from_secs(300), Some(b"{\"a\":1}"), 7);
        assert_eq!(found.epoch(), 7);
        // Epochs are compared on their low 24 bits.
        let late = Entry::new(0, Duration::from_secs(1), None, 0x0123_4567);
        assert_eq!(late.epoch(), 0x23_4567);
        assert!(matches!(late.answer(), CachedAnswer::NotFound));
        let CachedAnswer::Found(body) = found.answer() else {
            panic!("found")
        };
        assert_eq!(&body[..], b"{\"a\":1}");
        assert_eq!(found.freshness(1_500), Ok(Duration::from_millis(299_500)));
        assert_eq!(found.freshness(302_000), Err(Duration::from_secs(1)));
        assert!(!format!("{found:?}").contains("\"a\""));

        let missing = Entry::new(0, Duration::from_secs(60), None, 0);
        assert!(matches!(missing.answer(), CachedAnswer::NotFound));
    }

    #[test]
    fn a_purge_moves_the_generation_of_its_own_slot_only() {
        let generations = Generations::new();
        let key = |first: u8| {
            let mut bytes = [0u8; 16];
            bytes[0] = first;
            CacheKey(bytes)
        };
        let (purged, other, same_slot) = (key(1), key(2), key(1));
        let before = [&purged, &other].map(|k| generations.of(k));
        generations.bump(&purged);
        assert_ne!(generations.of(&purged), before[0]);
        assert_eq!(generations.of(&same_slot), generations.of(&purged));
        assert_eq!(
            generations.of(&other),
            before[1],
            "other keys' lookups still store"
        );
        let before_all = generations.of(&other);
        generations.bump_all();
        assert_ne!(
            generations.of(&other),
            before_all,
            "a purge of everything moves every key"
        );
    }

    #[test]
    fn hit_headers_report_whole_seconds_left() {
        assert_eq!(
            CacheStatus::Hit { ttl_s: 42 }.header_value(),
            "skypostal-proxy; hit; ttl=42"
        );
        assert_eq!(
            CacheStatus::StaleIfError {
                fwd_status: None,
                past_s: 3
            }
            .header_value(),
            "skypostal-proxy; fwd=stale; ttl=-3; detail=stale-if-error"
        );
    }
}
