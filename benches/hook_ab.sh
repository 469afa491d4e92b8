#!/usr/bin/env bash
# Hook latency of two builds, alternating on the same harness (issue 4):
#   benches/hook_ab.sh OLD_L3HV OLD_L3HVD NEW_L3HV NEW_L3HVD [ROUNDS]
# Builds the release hook test once, then for each round runs its `latency`
# test (L3HV_HOOK_RUNS, default 1,000 prepares and releases per transport,
# in a namespace with a private dbus-daemon) with the old binaries copied to
# target/release, then the new ones. target/release/l3hv{,d} are left as the
# new build. Take /tmp/l3hv-quiet.lock around it if other jobs share the
# machine.
set -euo pipefail
cd "$(dirname "$0")/.."
(($# >= 4)) || { sed -n 2,9p "$0"; exit 2; }
OLD=("$1" "$2") NEW=("$3" "$4") ROUNDS=${5:-2}
for f in "${OLD[@]}" "${NEW[@]}"; do
    [[ -x $f ]] || { echo "hook_ab: $f is not an executable" >&2; exit 2; }
done
# Copies first: building the test may replace target/release/l3hv{,d}.
TMP=$(mktemp -d /tmp/l3hv-hookab.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
cp "${OLD[0]}" "$TMP/old-l3hv"; cp "${OLD[1]}" "$TMP/old-l3hvd"
cp "${NEW[0]}" "$TMP/new-l3hv"; cp "${NEW[1]}" "$TMP/new-l3hvd"
TEST=$(cargo test --release --test hook --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "hook" and m.get("executable"):
        print(m["executable"])')
install_() {
    cp "$TMP/$1-l3hv" target/release/l3hv.tmp && mv target/release/l3hv.tmp target/release/l3hv
    cp "$TMP/$1-l3hvd" target/release/l3hvd.tmp && mv target/release/l3hvd.tmp target/release/l3hvd
}
for ((i = 1; i <= ROUNDS; i++)); do
    for which in old new; do
        install_ "$which"
        echo "=== $which, round $i ($(date -u +%H:%M:%S) UTC)"
        L3HV_HOOK_RUNS=${L3HV_HOOK_RUNS:-1000} "$TEST" --ignored --nocapture latency 2>&1 |
            grep -E '^(dbus|socket) (prepare|release)'
    done
done
