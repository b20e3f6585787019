#!/usr/bin/env bash
# Load test of a local release build against the built-in partner simulator, on loopback only.
#
#   bench/load.sh [hit|miss|fill N|soak S] ...
#
#   hit       wrk, 1,000 cached addresses (after a warm-up pass)
#   miss      wrk, every request a new address (each a partner call)
#   fill N    N distinct addresses through the cache, then the resident memory (RSS)
#   soak S    the hit workload for S seconds, printing RSS every 10 s
#   shared-hit  wrk over 1,000 addresses with the in-memory cache too small to hold them: every
#             request is answered from the shared Redis tier (implies SHARED=1)
#
# SHARED=1 starts a redis-server (REDIS_PORT, 9392) and turns the shared tier on; `miss` then
# includes the Redis read, write and global-quota call, and `fill` also reports Redis's memory.
#
# Installs wrk from the distribution's packages if it is missing, builds the release binary,
# pins the service to core 0 and the load (and the simulator) to core 1 when there are 2+ cores.
# Settings: DURATION (10), CONNECTIONS (64), SERVICE_PORT (9390), PARTNER_PORT (9391), SHARED.
REDIS_PORT=${REDIS_PORT:-9392}
[[ ${1:-} == shared-hit ]] && SHARED=1
SHARED=${SHARED:-0}
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
SERVICE_PORT=${SERVICE_PORT:-9390}
PARTNER_PORT=${PARTNER_PORT:-9391}
BIN=target/release/skypostal-proxy
# As the container image does: see BENCHMARKS.md.
export MIMALLOC_PURGE_DELAY=${MIMALLOC_PURGE_DELAY:-1000}

if ! command -v wrk >/dev/null; then
    echo "installing wrk" >&2
    if [[ $(id -u) == 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet

if [[ $(nproc) -ge 2 ]]; then SERVER_CPU=(taskset -c 0); LOAD_CPU=(taskset -c 1); else SERVER_CPU=(); LOAD_CPU=(); fi

source .ci/lib.sh
API_KEY=$(random_key)
export API_KEY
hash=$(key_sha256 "$API_KEY")

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    return 1
}

start() { # start MAX_ENTRIES
    cat >"$work/config.toml" <<CONF
[server]
listen = "127.0.0.1:$SERVICE_PORT"

[upstream]
base_url = "http://127.0.0.1:$PARTNER_PORT"
max_concurrency = 256
max_rps = 1000000

[cache]
max_entries = $1

[rate_limit]
default_per_s = 10000000
default_burst = 10000000

[[clients]]
name = "load"
key_sha256 = "$hash"

[log]
level = "warn"
CONF
    if [[ $SHARED == 1 ]]; then
        "${LOAD_CPU[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
            --appendonly no >/dev/null 2>&1 &
        pids+=($!)
        wait_port "$REDIS_PORT"
        head -c 32 /dev/urandom | base64 >"$work/redis_keys"
        printf '\n[redis]\nurl = "redis://127.0.0.1:%s"\nencryption_key_file = "%s"\n' \
            "$REDIS_PORT" "$work/redis_keys" >>"$work/config.toml"
    fi
    "${LOAD_CPU[@]}" "$BIN" mock-upstream --listen "127.0.0.1:$PARTNER_PORT" >/dev/null 2>&1 &
    pids+=($!)
    wait_port "$PARTNER_PORT"
    "${SERVER_CPU[@]}" "$BIN" serve --config "$work/config.toml" 2>"$work/service.log" &
    SERVICE_PID=$!
    pids+=("$SERVICE_PID")
    wait_port "$SERVICE_PORT"
}

rss_mib() { awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$SERVICE_PID/status"; }

wrk_run() { # wrk_run SCRIPT SECONDS
    "${LOAD_CPU[@]}" wrk -t1 -c"$CONNECTIONS" -d"$2"s --latency -s "bench/$1.lua" "http://127.0.0.1:$SERVICE_PORT"
}

mode=${1:-hit}
case $mode in
    hit)
        start 100000
        wrk_run hit 3 >/dev/null
        wrk_run hit "$DURATION"
        echo "RSS after the run: $(rss_mib) MiB"
        ;;
    miss)
        start 100000
        RUN_ID=$RANDOM wrk_run miss "$DURATION"
        echo "partner calls: $(curl -s "http://127.0.0.1:$PARTNER_PORT/__sim/stats")"
        ;;
    fill)
        n=${2:?fill needs a count}
        start "$n"
        echo "idle RSS: $(rss_mib) MiB"
        RUN_ID=fill "${LOAD_CPU[@]}" wrk -t1 -c"$CONNECTIONS" -d3600s -s bench/miss.lua \
            "http://127.0.0.1:$SERVICE_PORT" >/dev/null &
        load=$!
        while :; do
            calls=$(curl -s "http://127.0.0.1:$PARTNER_PORT/__sim/stats" | sed 's/.*"calls":\([0-9]*\).*/\1/')
            if [[ $calls -ge $n ]]; then break; fi
            sleep 1
        done
        kill "$load" 2>/dev/null || true
        wait "$load" 2>/dev/null || true
        sleep 1
        entries=$(curl -s "http://127.0.0.1:$SERVICE_PORT/readyz" | sed 's/.*"entries":\([0-9]*\).*/\1/')
        echo "after $calls partner calls: $entries cached entries, RSS $(rss_mib) MiB"
        if [[ $SHARED == 1 ]]; then
            redis-cli -p "$REDIS_PORT" info memory | grep -E '^used_memory(_human)?:'
            echo "redis keys: $(redis-cli -p "$REDIS_PORT" dbsize)"
        fi
        ;;
    shared-hit)
        start 1
        wrk_run hit 3 >/dev/null
        wrk_run hit "$DURATION"
        echo "partner calls: $(curl -s "http://127.0.0.1:$PARTNER_PORT/__sim/stats")"
        ;;
    soak)
        seconds=${2:-60}
        start 100000
        wrk_run hit 3 >/dev/null
        echo "RSS before: $(rss_mib) MiB"
        "${LOAD_CPU[@]}" wrk -t1 -c"$CONNECTIONS" -d"${seconds}"s -s bench/hit.lua \
            "http://127.0.0.1:$SERVICE_PORT" >"$work/soak.txt" &
        load=$!
        for ((t = 10; t <= seconds; t += 10)); do sleep 10; echo "t=${t}s RSS $(rss_mib) MiB"; done
        wait "$load"
        grep -E "Requests/sec|Non-2xx" "$work/soak.txt" || true
        ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 2
        ;;
esac
