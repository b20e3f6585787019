# shellcheck shell=bash
# Helpers shared by .ci/contract.sh and bench/load.sh. Source it; do not run it.

# A scratch folder in $work, and $pids: everything started is stopped, and the folder removed,
# when the script exits.
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# A fresh caller key: 256 random bits, URL-safe base64.
random_key() { head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='; }

# The lowercase hex SHA-256 of a key, as [[clients]] key_sha256 wants it.
key_sha256() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
