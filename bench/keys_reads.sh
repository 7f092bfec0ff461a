#!/usr/bin/env bash
# Reads of the per-key and service aggregates with 10,000,000 detail rows over
# 80 days, 10,000 users and 20 keys: key_usage_summary, usage_overview and the
# key_health view, latency p50/p99 from one client (pgbench -M prepared), each
# twice: with nothing pending, and while 4 clients insert (the applier running,
# so the reads add pending calls in). The summary over the detail (a GROUP BY)
# is measured once for scale.
#
#   bash bench/keys_reads.sh
#   BENCH_READ_ROWS_M=2 BENCH_SECONDS=5 bash bench/keys_reads.sh   # a quick look
source "$(dirname "$0")/../scripts/lib.sh"
ua_setup
ua_install_extension

BENCH="$UA_ROOT/bench"
PORT="${USAGE_AGG_BENCH_PORT:-28817}"
SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
ROUNDS="${BENCH_ROUNDS:-3}"
ROWS_M="${BENCH_READ_ROWS_M:-10}"
OUT="${BENCH_OUT:-$BENCH/results/keys-reads-latest.md}"
TMP="$(mktemp -d)"
chmod 755 "$TMP"
RAW="$TMP/raw"
touch "$RAW"
mkdir -p "$(dirname "$OUT")"
STARTED_AT=$(date +%s)
sql() { ua_psql "$PORT" bench_keys -At -c "$1"; }

ua_cluster_start bench "$PORT" "shared_preload_libraries = 'pg_cron,usage_agg'" "max_worker_processes = 32" \
    "shared_buffers = '1GB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'"
trap 'ua_cluster_stop bench; rm -rf "$TMP"' EXIT
ua_psql "$PORT" postgres -c "CREATE DATABASE bench_keys" >/dev/null
sql "CREATE EXTENSION usage_agg" >/dev/null
# Loaded folding at once (then one apply for the per-key deltas): faster than
# queueing ten million calls for the applier.
sql "UPDATE usage_agg.config SET fold_mode = 'immediate'" >/dev/null
t0=$(date +%s)
for i in $(seq 1 "$ROWS_M"); do
    ua_psql "$PORT" bench_keys -f "$BENCH/history_keys_1m.sql" >/dev/null
    ua_log "history: ${i}M detail rows"
done
sql "SELECT usage_agg.apply_pending_deltas()" >/dev/null
LOAD_SECONDS=$(( $(date +%s) - t0 ))
sql "UPDATE usage_agg.config SET fold_mode = DEFAULT" >/dev/null
ua_psql "$PORT" bench_keys -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
bad=$(sql "SELECT count(*) FROM usage_agg.verify_key_daily_logs(current_date - 81, current_date)")
[ "$bad" = 0 ] || { echo "verify_key_daily_logs found $bad differences after the load" >&2; exit 1; }
for _ in $(seq 1 100); do
    [ "$(sql "SELECT effective_mode FROM usage_agg.fold_status")" = async ] && break
    sleep 0.1
done
[ "$(sql "SELECT effective_mode FROM usage_agg.fold_status")" = async ] \
    || { echo "the applier is not running" >&2; exit 1; }

# run_read LABEL SCRIPT: appends "LABEL tps p50 p99" (ms)
run_read() {
    local dir; dir="$(mktemp -d -p "$TMP")"
    (cd "$dir" && "${UA_PG_BIN}/pgbench" -n -M prepared -c 1 -j 1 -T "$SECONDS_PER_RUN" -l --log-prefix=tx \
        -h 127.0.0.1 -p "$PORT" -U postgres -f "$2" bench_keys >out 2>&1) || true
    local tps pct
    tps=$(awk '/^tps = / {print $3; exit}' "$dir/out")
    pct=$(cat "$dir"/tx.* | awk '{print $3 / 1000}' | sort -g \
          | awk '{a[NR] = $1} END {printf "%.3f %.3f", a[int(NR * 0.5) + 1], a[int(NR * 0.99) + 1]}')
    echo "$1 ${tps:-0} $pct" >>"$RAW"
    ua_log "$1: ${tps:-0} tps, p50/p99 $pct ms"
    rm -rf "$dir"
}

for round in $(seq 1 "$ROUNDS"); do
    for r in key_summary overview key_health; do
        run_read "${r}_idle" "$BENCH/read_$r.pgbench"
    done
    # The same with 4 clients inserting (single rows, async: pending calls present).
    (cd "$TMP" && exec "${UA_PG_BIN}/pgbench" -n -M prepared -c 4 -j 2 -T $(( 3 * SECONDS_PER_RUN + 5 )) \
        -h 127.0.0.1 -p "$PORT" -U postgres -f "$BENCH/insert_one.pgbench" bench_keys >/dev/null 2>&1) &
    loader=$!
    sleep 2
    for r in key_summary overview key_health; do
        run_read "${r}_loaded" "$BENCH/read_$r.pgbench"
    done
    wait "$loader"
done
PENDING_SEEN=$(sql "SELECT count(*) FROM usage_agg.pending_deltas")
t0=$(date +%s%N)
sql "SELECT count(*), sum(cost_estimate) FROM usage_agg.key_usage_logs
      WHERE shared_key_id = '10000000-0000-0000-0000-000000000003'" >/dev/null
DETAIL_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
while [ "$(sql "SELECT (SELECT count(*) FROM usage_agg.pending_deltas) + (SELECT count(*) FROM usage_agg.pending_key_deltas)")" != 0 ]; do sleep 0.1; done
bad=$(sql "SELECT count(*) FROM usage_agg.verify_key_daily_logs(current_date - 81, current_date)")
[ "$bad" = 0 ] || { echo "verify_key_daily_logs found $bad differences after the reads" >&2; exit 1; }

median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print ""; else print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
get() { awk -v w="$1" -v f="$2" '$1==w {print $f}' "$RAW" | median; }
{
    echo "# usage_agg: reads of the per-key and service aggregates"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), took $(( ($(date +%s) - STARTED_AT) / 60 )) min (loading ${ROWS_M}M rows: ${LOAD_SECONDS} s)"
    echo "- machine: $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $(uname -srm)"
    echo "- server: $("${UA_PG_BIN}/postgres" --version), shared_buffers 1GB, usage_agg preloaded (applier running)"
    echo "- command: \`BENCH_READ_ROWS_M=$ROWS_M BENCH_SECONDS=$SECONDS_PER_RUN BENCH_ROUNDS=$ROUNDS bash bench/keys_reads.sh\`"
    echo "- ${ROWS_M},000,000 detail rows over 80 days, 10,000 users, 20 keys; pgbench -M prepared, 1 client, ${SECONDS_PER_RUN} s per run, medians of $ROUNDS rounds"
    echo "- loaded: the same reads while 4 clients insert single rows (async mode; ${PENDING_SEEN} calls were pending when the last read run ended)"
    echo
    echo "| read | idle: p50 / p99 ms | idle: tps | while inserting: p50 / p99 ms | while inserting: tps |"
    echo "|---|---:|---:|---:|---:|"
    for r in key_summary overview key_health; do
        echo "| $r | $(get "${r}_idle" 3) / $(get "${r}_idle" 4) | $(get "${r}_idle" 2) | $(get "${r}_loaded" 3) / $(get "${r}_loaded" 4) | $(get "${r}_loaded" 2) |"
    done
    echo
    echo "For scale: one key's calls and cost summed over the detail (a GROUP BY, no aggregates): ${DETAIL_MS} ms."
    echo
    echo '```'
    cat "$RAW"
    echo '```'
} | tee "$OUT"
ua_log "written to $OUT"
