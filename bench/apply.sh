#!/usr/bin/env bash
# What folding pending calls costs the applier, measured on its own: calls are
# recorded with nobody applying (fold_mode 'async', usage_agg not preloaded),
# then one apply_pending_deltas() folds them while nothing else runs. Reported
# per call: server time of the apply and the WAL it writes, for calls of users
# whose day has no daily row yet ("new days") and of users whose day has one
# ("existing days").
#
#   bash bench/apply.sh
#   BENCH_CALLS=40000 BENCH_ROUNDS=5 bash bench/apply.sh
source "$(dirname "$0")/../scripts/lib.sh"
ua_setup
[ "${BENCH_SKIP_INSTALL:-}" = 1 ] || ua_install_extension

BENCH="$UA_ROOT/bench"
PORT="${USAGE_AGG_BENCH_PORT:-28817}"
CALLS="${BENCH_CALLS:-20000}"
ROUNDS="${BENCH_ROUNDS:-3}"
OUT="${BENCH_OUT:-$BENCH/results/apply-latest.md}"
ua_cluster_start bench "$PORT" "shared_buffers = '1GB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'"
trap 'ua_cluster_stop bench' EXIT
ua_psql "$PORT" postgres -c "CREATE DATABASE bench_apply" >/dev/null
sql() { ua_psql "$PORT" bench_apply -At -c "$1"; }
sql "CREATE EXTENSION usage_agg" >/dev/null
sql "UPDATE usage_agg.config SET fold_mode = 'async'" >/dev/null

record() {  # record CALLS: single-row inserts over 10,000 users, 4 clients
    "${UA_PG_BIN}/pgbench" -n -M prepared -c 4 -j 2 -t $(( $1 / 4 )) -h 127.0.0.1 -p "$PORT" -U postgres \
        -f "$BENCH/insert_one.pgbench" bench_apply >/dev/null 2>&1
}
apply() {  # prints "calls µs_per_call wal_bytes_per_call"
    local lsn0 out ms n lsn1
    sql "CHECKPOINT" >/dev/null
    lsn0=$(sql "SELECT pg_current_wal_lsn()")
    out=$(ua_psql "$PORT" bench_apply -At -c '\timing on' -c "SELECT usage_agg.apply_pending_deltas()")
    n=$(echo "$out" | head -1)
    ms=$(echo "$out" | awk '/^Time: / {print $2; exit}')
    lsn1=$(sql "SELECT pg_current_wal_lsn()")
    awk -v n="$n" -v ms="$ms" -v b="$(sql "SELECT pg_wal_lsn_diff('$lsn1', '$lsn0')")" \
        'BEGIN { printf "%d %.1f %.0f\n", n, ms * 1000 / n, b / n }'
}
RAW=$(mktemp)
for round in $(seq 1 "$ROUNDS"); do
    sql "TRUNCATE usage_agg.key_usage_logs, usage_agg.daily_logs, usage_agg.pending_deltas" >/dev/null
    sql "VACUUM ANALYZE" >/dev/null
    record "$CALLS"
    echo "new $(apply)" | tee -a "$RAW"
    record "$CALLS"
    echo "existing $(apply)" | tee -a "$RAW"
    bad=$(sql "SELECT count(*) FROM usage_agg.verify_daily_logs(current_date - 1, current_date + 1)")
    [ "$bad" = 0 ] || { echo "verify_daily_logs found $bad differences" >&2; exit 1; }
done
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
{
    echo "# usage_agg: the applier's cost per call"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)); $("${UA_PG_BIN}/postgres" --version); commit $(git -C "$UA_ROOT" rev-parse --short HEAD)"
    echo "- command: \`BENCH_CALLS=$CALLS BENCH_ROUNDS=$ROUNDS bash bench/apply.sh\`"
    echo "- $CALLS single-row calls over 10,000 users, 20 keys, 3 models recorded with nobody applying, then one \`apply_pending_deltas()\`; medians of $ROUNDS rounds"
    echo
    echo "| days | µs per call (apply) | WAL bytes per call (apply) |"
    echo "|---|---:|---:|"
    for k in new existing; do
        echo "| $k | $(awk -v k=$k '$1 == k {print $3}' "$RAW" | median) | $(awk -v k=$k '$1 == k {print $4}' "$RAW" | median) |"
    done
} | tee "$OUT"
rm -f "$RAW"
