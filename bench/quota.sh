#!/usr/bin/env bash
# Quota benchmark for issue 15, side by side in one run: usage_agg's
# consume_quota as shipped, the same with its function layers flattened
# (quota_one_layer.sql, a lever under study), and the function a team would
# write by hand (quota_handwritten.sql: same tables and indexes). 16 clients,
# pgbench -M prepared, every user on a plan that never refuses; consume_many
# (a random user of 10,000) and consume_one (every client on one user).
# Rounds interleave the contenders so that machine noise hits them alike.
# Per run: tps, p50/p99 ms, WAL bytes per call; and afterwards a check that
# monthly_used equals the sum of the logged amounts for every user.
#
#   bash bench/quota.sh            (BENCH_SECONDS=10 BENCH_ROUNDS=3 BENCH_OUT=...)
source "$(dirname "$0")/../scripts/lib.sh"
ua_setup
ua_install_extension

BENCH="$UA_ROOT/bench"
PORT="${USAGE_AGG_BENCH_PORT:-28817}"
SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
ROUNDS="${BENCH_ROUNDS:-3}"
CLIENTS=16
OUT="${BENCH_OUT:-$BENCH/results/latest-quota.md}"
CONTENDERS=(usage_agg one_layer handwritten)
TMP="$(mktemp -d)"
RAW="$TMP/raw"

ua_cluster_start bench "$PORT" "shared_preload_libraries = 'pg_cron,usage_agg'" \
    "shared_buffers = '1GB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'"
trap 'ua_cluster_stop bench; rm -rf "$TMP"' EXIT
sql() { ua_psql "$PORT" "bench_$1" -At -c "$2"; }
for c in "${CONTENDERS[@]}"; do
    ua_psql "$PORT" postgres -c "DROP DATABASE IF EXISTS bench_$c" -c "CREATE DATABASE bench_$c" >/dev/null
done
for c in usage_agg one_layer; do
    sql "$c" "CREATE EXTENSION usage_agg" >/dev/null
    ua_psql "$PORT" "bench_$c" -f "$BENCH/quota_setup.sql" >/dev/null
done
ua_psql "$PORT" bench_one_layer -f "$BENCH/quota_one_layer.sql" >/dev/null
ua_psql "$PORT" bench_handwritten -f "$BENCH/quota_handwritten.sql" >/dev/null

# run LABEL CONTENDER SCRIPT: appends "LABEL CONTENDER tps p50 p99 wal_per_call errors".
run() {
    local label="$1" c="$2" script="$3" dir lsn0 lsn1 tps pct calls wal errors
    dir="$(mktemp -d -p "$TMP")"
    lsn0=$(sql "$c" "SELECT pg_current_wal_lsn()")
    (cd "$dir" && "${UA_PG_BIN}/pgbench" -n -M prepared -c "$CLIENTS" -j 2 -T "$SECONDS_PER_RUN" -l --log-prefix=tx \
        -h 127.0.0.1 -p "$PORT" -U postgres -f "$script" "bench_$c" >out 2>&1) || true
    lsn1=$(sql "$c" "SELECT pg_current_wal_lsn()")
    tps=$(awk '/^tps = / {print $3; exit}' "$dir/out")
    calls=$(awk '/number of transactions actually processed/ {print $6; exit}' "$dir/out" | cut -d/ -f1)
    errors=$(awk '/number of failed transactions/ {print $5; exit}' "$dir/out" | tr -dc 0-9)
    wal=$(( $(sql "$c" "SELECT pg_wal_lsn_diff('$lsn1', '$lsn0')::bigint") / ${calls:-1} ))
    pct=$(cat "$dir"/tx.* | awk '{print $3 / 1000}' | sort -g \
          | awk '{a[NR] = $1} END {printf "%.3f %.3f", a[int(NR * 0.5) + 1], a[int(NR * 0.99) + 1]}')
    echo "$label $c ${tps:-0} $pct $wal ${errors:-0}" >>"$RAW"
    ua_log "$label $c: ${tps:-0} tps, p50/p99 $pct ms, $wal WAL bytes/call, ${errors:-0} errors"
    rm -rf "$dir"
}

for round in $(seq 1 "$ROUNDS"); do
    for w in many one; do
        for c in "${CONTENDERS[@]}"; do
            run "consume_$w" "$c" "$BENCH/consume_$w.pgbench"
        done
    done
done
for c in "${CONTENDERS[@]}"; do
    bad=$(sql "$c" "SELECT count(*) FROM usage_agg.quotas q
            WHERE q.monthly_used <> (SELECT coalesce(sum(amount), 0) FROM usage_agg.quota_usage_logs l WHERE l.user_id = q.user_id)")
    [ "$bad" = "0" ] || { echo "$c: quota accounting disagrees for $bad users" >&2; exit 1; }
done

median() {  # median LABEL CONTENDER FIELD (3 tps, 4 p50, 5 p99, 6 wal)
    awk -v l="$1" -v c="$2" -v f="$3" '$1 == l && $2 == c {print $f}' "$RAW" | sort -g \
        | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'
}
{
    echo "# Quota step: usage_agg, flattened lever, hand-written function"
    echo
    echo "- command: \`BENCH_SECONDS=$SECONDS_PER_RUN BENCH_ROUNDS=$ROUNDS bash bench/quota.sh\`"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)); $("${UA_PG_BIN}/postgres" --version); commit $(git -C "$UA_ROOT" rev-parse --short HEAD)"
    echo "- pgbench -M prepared, $CLIENTS clients, ${SECONDS_PER_RUN} s per run, medians of $ROUNDS interleaved rounds; shared_buffers 1GB, fsync and synchronous_commit on"
    echo
    echo "| workload | contender | tps | vs hand-written | p50 ms | p99 ms | WAL bytes/call |"
    echo "|---|---|---|---|---|---|---|"
    for w in many one; do
        hw=$(median "consume_$w" handwritten 3)
        for c in "${CONTENDERS[@]}"; do
            t=$(median "consume_$w" "$c" 3)
            echo "| consume_$w | $c | $t | $(awk -v a="$t" -v b="$hw" 'BEGIN {printf "%.2fx", a / b}') | $(median "consume_$w" "$c" 4) | $(median "consume_$w" "$c" 5) | $(median "consume_$w" "$c" 6) |"
        done
    done
    echo
    echo "Raw runs (label contender tps p50 p99 wal_per_call errors):"
    echo
    sed 's/^/    /' "$RAW"
} >"$OUT"
cat "$OUT"
