//! Purges across replicas, made so that none is lost or undone.
//!
//! A purge runs as one Lua script, so Redis applies it atomically: it deletes the entry under
//! every name, sets a short-lived *tombstone* per name, appends the digests to a capped stream
//! (the purge log) and publishes them with the log entry's id.
//!
//! - The tombstone stops a lookup that started before the purge, on any replica, from writing
//!   the old answer back: entries are stored by [`STORE_LUA`], which writes nothing while a
//!   tombstone exists.
//! - The log lets a replica whose subscription was down catch up: on every (re)subscription it
//!   reads the log from the last id it saw. If the log no longer reaches back that far, the
//!   replica drops its whole in-memory cache instead (see [`plan`]).

use std::fmt;

/// Entries kept in the purge log. Trimming is exact, so a log shorter than this was never
/// trimmed and holds every purge since it was created.
pub(super) const LOG_LEN: usize = 10_000;

/// KEYS[1]: the purge log; then the entry's keys; then as many tombstone keys.
/// ARGV[1]: tombstone lifetime in ms; ARGV[2]: log length; ARGV[3]: the digests;
/// ARGV[4]: the channel; ARGV[5]: the sending instance. Returns the log entry's id.
pub(super) const PURGE_LUA: &str = r"
local n = (#KEYS - 1) / 2
for i = 2, n + 1 do
  redis.call('DEL', KEYS[i])
  redis.call('SET', KEYS[i + n], '1', 'PX', ARGV[1])
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '*', 'd', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. id .. ' ' .. ARGV[3])
return id
";

/// KEYS[1]: the entry; KEYS[2]: its tombstone. ARGV[1]: the sealed value; ARGV[2]: its lifetime
/// in ms. Returns 1 if written, 0 if a purge forbade it.
pub(super) const STORE_LUA: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// A purge log entry's id: milliseconds and sequence number, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct LogId(u64, u64);

impl LogId {
    pub(super) fn parse(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?;
        let (ms, seq) = text.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One announcement on the purge channel: `<sender> <log id> <digests>`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Announcement<'a> {
    pub sender: &'a [u8],
    pub id: LogId,
    pub digests: &'a [u8],
}

impl<'a> Announcement<'a> {
    /// `None` for anything that is not an announcement with whole digests.
    pub(super) fn parse(payload: &'a [u8], digest_len: usize) -> Option<Self> {
        let mut parts = payload.splitn(3, |b| *b == b' ');
        let sender = parts.next()?;
        let id = LogId::parse(parts.next()?)?;
        let digests = parts.next()?;
        (!digests.is_empty() && digests.len() % digest_len == 0).then_some(Self {
            sender,
            id,
            digests,
        })
    }
}

/// What a replica does with the log it read after subscribing.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Apply the entries from this index on: they are the purges it may have missed.
    Apply(usize),
    /// The log read from the cursor does not start at it: read the whole log.
    ReadAll,
    /// Purges may have been trimmed from the log unseen: drop every in-memory entry.
    Clear,
}

/// Decides from the log read from `cursor` on (inclusive), or the whole log when `whole`.
pub(super) fn plan(cursor: Option<LogId>, ids: &[LogId], whole: bool) -> Plan {
    if let Some(at) = cursor.and_then(|c| ids.iter().position(|id| *id == c)) {
        return Plan::Apply(at + 1);
    }
    if !whole {
        return Plan::ReadAll;
    }
    if ids.len() < LOG_LEN {
        // Never trimmed (or Redis restarted empty): it holds every purge since it began.
        Plan::Apply(0)
    } else {
        Plan::Clear
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ids_parse_and_order_like_redis() {
        let a = LogId::parse(b"1700000000000-0").expect("valid id");
        let b = LogId::parse(b"1700000000000-12").expect("valid id");
        let c = LogId::parse(b"1700000000001-0").expect("valid id");
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-12");
        for bad in [&b""[..], b"12", b"a-1", b"1-", b"-1", b"1-2-3"] {
            assert_eq!(LogId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn announcements_carry_sender_id_and_whole_digests() {
        let mut payload = b"abc 5-1 ".to_vec();
        // Digests are binary and may hold spaces themselves.
        payload.extend_from_slice(&[b' '; 4]);
        payload.extend_from_slice(&[7; 4]);
        let parsed = Announcement::parse(&payload, 4).expect("an announcement");
        assert_eq!(parsed.sender, b"abc");
        assert_eq!(parsed.id, LogId(5, 1));
        assert_eq!(parsed.digests.len(), 8);

        assert_eq!(
            Announcement::parse(b"abc 5-1 123", 4),
            None,
            "partial digest"
        );
        assert_eq!(Announcement::parse(b"abc 5-1 ", 4), None, "no digest");
        assert_eq!(Announcement::parse(b"abc x 1234", 4), None, "no id");
        assert_eq!(Announcement::parse(b"1234", 4), None, "old format");
    }

    #[test]
    fn a_log_that_reaches_the_cursor_is_applied_after_it() {
        let ids = [LogId(1, 0), LogId(2, 0), LogId(3, 0)];
        assert_eq!(plan(Some(LogId(1, 0)), &ids, false), Plan::Apply(1));
        assert_eq!(plan(Some(LogId(3, 0)), &ids, false), Plan::Apply(3));
        assert_eq!(plan(Some(LogId(2, 0)), &ids, true), Plan::Apply(2));
    }

    #[test]
    fn a_log_that_misses_the_cursor_is_read_whole_then_applied_or_cleared() {
        let ids = [LogId(5, 0), LogId(6, 0)];
        assert_eq!(plan(Some(LogId(1, 0)), &ids, false), Plan::ReadAll);
        assert_eq!(plan(Some(LogId(1, 0)), &[], false), Plan::ReadAll);
        // A short log was never trimmed: Redis restarted, and these are all its purges.
        assert_eq!(plan(Some(LogId(1, 0)), &ids, true), Plan::Apply(0));
        assert_eq!(plan(None, &ids, true), Plan::Apply(0));
        assert_eq!(plan(None, &[], true), Plan::Apply(0));
        // A full log may have lost the purges between the cursor and its start.
        let full: Vec<_> = (10..10 + LOG_LEN as u64).map(|ms| LogId(ms, 0)).collect();
        assert_eq!(plan(Some(LogId(1, 0)), &full, true), Plan::Clear);
        assert_eq!(plan(None, &full, true), Plan::Clear);
    }
}
