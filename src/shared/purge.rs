//! Purges across replicas, made so that none is lost or undone.
//!
//! A purge runs as one Lua script, so Redis applies it atomically: it deletes the entry under
//! every name, sets a short-lived *tombstone* per name, appends the digests to a capped stream
//! (the purge log) and publishes them with the log entry's id.
//!
//! - The tombstone stops a lookup that started before the purge, on any replica, from writing
//!   the old answer back: entries are stored by [`STORE_LUA`], which writes nothing while a
//!   tombstone exists.
//! - The log lets a replica whose subscription was down catch up: on every resubscription it
//!   reads the log from the last id it saw. If the log no longer holds that id (trimmed past
//!   it, or a new log after Redis restarted or evicted it), the replica stops trusting what it
//!   holds in memory instead (see [`plan`]). An empty log gets an empty entry, so that every
//!   replica has an id to look for.

use std::fmt;

/// Entries kept in the purge log.
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
/// in ms; ARGV[3]: the latest time, in microseconds on Redis's clock, at which the write may
/// still happen (`0`: no bound). Returns 1 if written, 0 if a purge forbade it, -1 if too late
/// (a write held up, by a `CLIENT PAUSE` say, until its tombstone could have expired).
pub(super) const STORE_LUA: &str = r"
if ARGV[3] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[3]) then
    return -1
  end
end
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

/// What a replica does with the log it read after subscribing again.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Apply the entries from this index on: they are the purges it may have missed.
    Apply(usize),
    /// The log no longer holds the last purge seen (trimmed past it, or a new log after a
    /// restart): purges may have been missed unseen, so trust nothing held in memory.
    Distrust,
}

/// Decides from the log read from `last` (the newest entry seen), inclusive.
pub(super) fn plan(last: LogId, ids: &[LogId]) -> Plan {
    match ids.iter().position(|id| *id == last) {
        Some(at) => Plan::Apply(at + 1),
        None => Plan::Distrust,
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
    fn a_log_that_holds_the_last_purge_seen_is_applied_after_it() {
        let ids = [LogId(1, 0), LogId(2, 0), LogId(3, 0)];
        assert_eq!(plan(LogId(1, 0), &ids), Plan::Apply(1));
        assert_eq!(plan(LogId(3, 0), &ids), Plan::Apply(3));
        assert_eq!(plan(LogId(2, 0), &ids[1..]), Plan::Apply(1));
    }

    #[test]
    fn a_log_without_the_last_purge_seen_is_distrusted() {
        // Trimmed past it, or a new log (a restart): it may have lost purges.
        assert_eq!(
            plan(LogId(1, 0), &[LogId(5, 0), LogId(6, 0)]),
            Plan::Distrust
        );
        assert_eq!(plan(LogId(1, 0), &[]), Plan::Distrust);
    }
}
