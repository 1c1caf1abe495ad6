#!/usr/bin/env bash
# The floor under `--malloc-probes node-buffers`: the cost of the traps alone, with no BPF
# program. Plain tracefs uprobes (filtered so that they record nothing) on the two
# functions node-buffers probes, against the untraced example service, under wrk.
#
#   sudo benches/node_trap_floor.sh [ROUNDS] [MODES]
#
# MODES (default "untraced traps"), run in turn each round: `untraced`; `traps`, the two
# uprobes; `sampling`, no uprobe but V8's sampling heap profiler started in the service
# itself (benches/v8_sampling_preload.js; SAMPLE_AFTER_MS=8000 starts it after the JIT
# warmed up, as memtrace's JS heap view does). Prints requests/s and the service's CPU
# per request for each run. Needs root, tracefs,
# wrk and examples/leaky-service's node_modules (`cargo xtask setup`).
set -euo pipefail
ROUNDS=${1:-3}
MODES=${2:-untraced traps}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T=/sys/kernel/tracing
NODE=$(readlink -f "$(command -v node)")
offset() { # file offset of a symbol of $NODE
  python3 - "$NODE" "$1" <<'PY'
import subprocess, sys
node, sym = sys.argv[1], sys.argv[2]
addr = next(int(l.split()[0], 16) for l in subprocess.run(["nm", node], capture_output=True, text=True).stdout.splitlines() if l.endswith(" " + sym))
for l in subprocess.run(["readelf", "-lW", node], capture_output=True, text=True).stdout.splitlines():
    f = l.split()
    if f and f[0] == "LOAD":
        off, va, memsz = int(f[1], 16), int(f[2], 16), int(f[5], 16)
        if va <= addr < va + memsz:
            print(hex(addr - va + off)); break
PY
}
ALLOC=$(offset _ZN2v88internal12BackingStore23SetAllocatorFromIsolateEPNS0_7IsolateE)
FREE=$(offset _ZN2v88internal12BackingStoreD2Ev)
run() {
  local mode=$1 out pid url u s u2 s2 reqs rps
  out=$(mktemp)
  local preload=()
  [ "$mode" = sampling ] && preload=(-r "$ROOT/benches/v8_sampling_preload.js")
  (cd "$ROOT/examples/leaky-service" && PORT=0 exec node "${preload[@]}" server.js >"$out" 2>&1) &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
  url=$(grep -o 'http://[0-9.:]*' "$out")
  if [ "$mode" = traps ]; then
    echo "p:memtrace_floor/alloc $NODE:$ALLOC" >>$T/uprobe_events
    echo "p:memtrace_floor/free $NODE:$FREE" >>$T/uprobe_events
    echo 'common_pid == 1' >$T/events/memtrace_floor/alloc/filter
    echo 'common_pid == 1' >$T/events/memtrace_floor/free/filter
    echo 1 >$T/events/memtrace_floor/enable
  fi
  wrk -t2 -c32 -d5s -s "$ROOT/examples/leaky-service/load.lua" "$url" >/dev/null
  read -r u s < <(awk '{print $14, $15}' /proc/$pid/stat)
  local load; load=$(wrk -t2 -c32 -d10s -s "$ROOT/examples/leaky-service/load.lua" "$url")
  read -r u2 s2 < <(awk '{print $14, $15}' /proc/$pid/stat)
  if [ "$mode" = traps ]; then
    echo 0 >$T/events/memtrace_floor/enable
    echo "-:memtrace_floor/alloc" >>$T/uprobe_events
    echo "-:memtrace_floor/free" >>$T/uprobe_events
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -f "$out"
  reqs=$(awk '/requests in/{print $1}' <<<"$load")
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$load")
  echo "$mode: $rps req/s, $(( (u2 + s2 - u - s) * 10000 / reqs )) µs CPU per request"
}
for _ in $(seq "$ROUNDS"); do for mode in $MODES; do run "$mode"; done; done
