//! The global partner quota: GCRA (the generic cell rate algorithm, as in governor) kept in one
//! Redis key and advanced by one Lua script, which Redis runs atomically, so every replica draws
//! from one budget of `upstream.max_rps` calls a second with a burst of the same size.
//!
//! The script reads Redis's own clock (`TIME`), so replicas' clocks do not have to agree. It
//! answers 0 when the call may start now (and records it), or the microseconds to wait first.

/// KEYS[1]: the quota key. ARGV[1]: microseconds between calls. ARGV[2]: burst tolerance in
/// microseconds (`(burst - 1) * interval`).
pub(super) const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local allowed_at = tat - tolerance
if now < allowed_at then
  return math.ceil(allowed_at - now)
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
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
