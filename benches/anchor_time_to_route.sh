#!/usr/bin/env bash
# The seed's setup (BIRD 2 on the hypervisors, BIRD 2 reflectors, two
# fabric paths) timed like benches/time_to_route.py, with as many samples:
# the anchor's own run takes 5-12, inside the timestamps' jitter. Uses the
# anchor's scripts unchanged (its setup, its test 1, its teardown, all in
# its anc-* namespaces, removed on exit).
#
#   sudo benches/anchor_time_to_route.sh [REPS]     default: 200
#
# ANCHOR_DIR: the anchor's directory (default ../shared/anchors/bird-lab
# next to the repository); ANCHOR_WORK: its work directory under /tmp.
# RT_MONITORS=1: the anchor's `ip monitor`s (in its anc-* namespaces) are
# set to real-time priority as they start, as time_to_route.py
# --rt-monitors does for l3hv: each then reads its event when the kernel
# sends it, not when a core is free. BIRD itself is left as it is.
set -euo pipefail
REPS=${1:-200}
HERE=$(cd "$(dirname "$0")/.." && pwd)
ANCHOR_DIR=${ANCHOR_DIR:-$HERE/../shared/anchors/bird-lab}
export ANCHOR_WORK=${ANCHOR_WORK:-/tmp/anchor-ttr}
[ -x "$ANCHOR_DIR/setup.sh" ] || { echo "no anchor at $ANCHOR_DIR" >&2; exit 1; }
trap '"$ANCHOR_DIR/teardown.sh"' EXIT
trap 'exit 130' INT TERM
"$ANCHOR_DIR/teardown.sh"
rm -rf "$ANCHOR_WORK"
mkdir -p "$ANCHOR_WORK"
"$ANCHOR_DIR/setup.sh" bird
if [ "${RT_MONITORS:-0}" = 1 ]; then
  (
    while :; do
      for pid in $(pgrep -f '^ip -ts -4 -o monitor route$'); do
        case "$(ip netns identify "$pid" 2>/dev/null)" in
          anc*) [ "$(chrt -p "$pid" 2>/dev/null | grep -c FIFO)" = 0 ] && chrt -f -p 10 "$pid" ;;
        esac
      done
      sleep 0.02
    done
  ) &
  RT_LOOP=$!
  trap 'kill "$RT_LOOP" 2>/dev/null; "$ANCHOR_DIR/teardown.sh"' EXIT
fi
cd "$ANCHOR_DIR"
python3 - "$REPS" <<'PY'
import sys, statistics
import bench
reps = int(sys.argv[1])
bench.wait_sessions('bird')
# Its prefixes are 203.0.113.<base + k>: at most 100 per call (each is
# deleted again before the next).
rows = []
while len(rows) < reps:
    n = min(100, reps - len(rows))
    rows += bench.test_time_to_route(n, f'bird{len(rows)}', base=100)['reps']
for key in ('hv1_to_hv2_first', 'hv1_to_hv2_ecmp'):
    v = sorted(r[key] * 1e3 for r in rows if r[key] is not None)
    print(f"{key}: n={len(v)} median {statistics.median(v):.2f} ms, "
          f"p99 {v[min(len(v) - 1, int(len(v) * 0.99))]:.2f} ms, min {v[0]:.2f}, max {v[-1]:.2f}")
PY
