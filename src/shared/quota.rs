//! The global partner quota: GCRA (the generic cell rate algorithm, as in governor) kept in one
//! Redis key and advanced by one Lua script, which Redis runs atomically, so every replica draws
//! from one budget of `upstream.max_rps` calls a second with a burst of the same size.
//!
//! The script reads Redis's own clock (`TIME`), so replicas' clocks do not have to agree. It
//! books the first free slot if the caller can wait for it, and answers how long to wait:
//! 0 to start now, a positive number of microseconds to wait first (the slot is the caller's),
//! or a negative number when the slot is further away than the caller can wait (nothing is
//! booked).

/// KEYS[1]: the quota key. ARGV[1]: microseconds between calls. ARGV[2]: burst tolerance in
/// microseconds (`(burst - 1) * interval`). ARGV[3]: the longest the caller can wait.
/// ARGV[4]: the furthest ahead any caller can book; a stored time beyond it can only come from
/// a clock that went back (a fail-over to another host), and is reset rather than obeyed.
pub(super) const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now or tat > now + tonumber(ARGV[4]) then tat = now end
local wait = tat - tolerance - now
if wait > max_wait then
  return -math.ceil(wait)
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
if wait <= 0 then
  return 0
end
return math.ceil(wait)
";

/// The script's arguments for `per_s` calls a second with a burst of `per_s`.
pub(super) fn gcra_args(per_s: u32) -> (u64, u64) {
    let interval_us = 1_000_000 / u64::from(per_s.max(1));
    let tolerance_us = interval_us * u64::from(per_s.max(1) - 1);
    (interval_us.max(1), tolerance_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_is_the_rate_and_calls_are_spaced_evenly() {
        assert_eq!(gcra_args(50), (20_000, 980_000));
        assert_eq!(gcra_args(1), (1_000_000, 0));
        assert_eq!(gcra_args(0), (1_000_000, 0));
    }
}
