#!/bin/sh
# Storm figures: memtrace attached to mmap_storm processes (one per core) at rising rates.
# For each rate it prints the rounds/s the storms made, the events/s memtrace ingested
# (its last status line) and the events it lost (its JSON report's lost_events), so
# the rate at which losses begin reads off the table.
#
#   sudo benches/storm.sh [MEMTRACE] [SECONDS] [RATES...]
#
# MEMTRACE defaults to target/release/memtrace; RATES are rounds/s per process, 0 is
# "as fast as it can". Each round is an mmap, 16 first-touch faults and a munmap.
set -eu
cd "$(dirname "$0")/.."
bin=${1:-target/release/memtrace}
seconds=${2:-10}
shift 2 2>/dev/null || shift $#
rates=${*:-250 500 1000 2000 0}
procs=$(nproc)
out=out/storm
mkdir -p "$out"
gcc -O2 -fno-omit-frame-pointer -o "$out/mmap_storm" benches/mmap_storm.c

echo "uptime: $(uptime)"
echo "| rate asked (rounds/s per process) | processes | rounds/s made | memtrace events/s | lost events | memtrace peak RSS |"
echo "|---:|---:|---:|---:|---:|---:|"
for rate in $rates; do
    pids=""
    i=0
    while [ "$i" -lt "$procs" ]; do
        # Started before memtrace, running past its end: memtrace sees a steady storm.
        "$out/mmap_storm" $((seconds + 8)) "$rate" > "$out/storm-$rate-$i.txt" &
        pids="$pids $!"
        i=$((i + 1))
    done
    json="$out/report-$rate.json"
    rm -f "$json"
    # shellcheck disable=SC2086
    /usr/bin/time -f "%M" -o "$out/rss-$rate.txt" \
        "$bin" attach $pids --duration "${seconds}s" --js-heap off --json "$json" \
        > "$out/report-$rate.txt" 2> "$out/memtrace-$rate.log" || echo "memtrace failed: $out/memtrace-$rate.log"
    # shellcheck disable=SC2086
    wait $pids
    made=$(cat "$out"/storm-"$rate"-*.txt | awk '{s += $1} END {printf "%.0f", s / '"$((seconds + 8))"'}')
    line=$(grep ' events ' "$out/memtrace-$rate.log" | tail -1)
    events=$(echo "$line" | sed -n 's/.* events \([0-9]*\) .*/\1/p')
    elapsed=$(echo "$line" | sed -n 's/^memtrace: *\([0-9.]*\)s .*/\1/p')
    per_s=$(awk "BEGIN {printf \"%.0f\", ${events:-0} / (${elapsed:-1} + 0.001)}")
    lost=$(jq -r '.lost_events' "$json" 2>/dev/null || echo "?")
    rss=$(awk '{printf "%.0f MiB", $1 / 1024}' "$out/rss-$rate.txt" 2>/dev/null || echo "?")
    label=$rate
    [ "$rate" = 0 ] && label="max"
    echo "| $label | $procs | $made | $per_s | $lost | $rss |"
done
