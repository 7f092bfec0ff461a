#!/usr/bin/env bash
# Quota benchmark for issue 15, side by side in one run: usage_agg's
# consume_quota as shipped (its common case one kept statement in Rust), the
# same statement in a PL/pgSQL function (quota_one_statement.sql, a lever
# measured; quota_one_layer.sql is the older flattened lever, BENCH_CONTENDERS
# can add it), and the function a team would write by hand
# (quota_handwritten.sql: same tables and indexes). 16 clients, pgbench -M
# prepared, every user on a plan that never refuses; consume_many (a random
# user of 10,000), consume_one (every client on one user) and consume_many_rid
# (a random user with a new request_id per call).
# Rounds interleave the contenders so that machine noise hits them alike.
# Per run: tps, p50/p99 ms, WAL bytes per call; and afterwards a check that
# monthly_used equals the sum of the logged amounts for every user.
#
#   bash bench/quota.sh            (BENCH_SECONDS=5 BENCH_ROUNDS=8 BENCH_OUT=...)
source "$(dirname "$0")/../scripts/lib.sh"
ua_setup
ua_install_extension

BENCH="$UA_ROOT/bench"
PORT="${USAGE_AGG_BENCH_PORT:-28817}"
SECONDS_PER_RUN="${BENCH_SECONDS:-5}"
ROUNDS="${BENCH_ROUNDS:-8}"
CLIENTS=16
OUT="${BENCH_OUT:-$BENCH/results/latest-quota.md}"
CONTENDERS=(${BENCH_CONTENDERS:-usage_agg one_statement handwritten})
WORKLOADS="${BENCH_WORKLOADS:-many one many_rid}"
TMP="$(mktemp -d)"
RAW="$TMP/raw"

ua_cluster_start bench "$PORT" "shared_preload_libraries = 'pg_cron,usage_agg'" \
    "shared_buffers = '1GB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'"
trap 'ua_cluster_stop bench; rm -rf "$TMP"' EXIT
sql() { ua_psql "$PORT" "bench_$1" -At -c "$2"; }
for c in "${CONTENDERS[@]}"; do
    ua_psql "$PORT" postgres -c "DROP DATABASE IF EXISTS bench_$c" -c "CREATE DATABASE bench_$c" >/dev/null
done
for c in "${CONTENDERS[@]}"; do
    case "$c" in
        handwritten) ua_psql "$PORT" bench_handwritten -f "$BENCH/quota_handwritten.sql" >/dev/null ;;
        *) sql "$c" "CREATE EXTENSION usage_agg" >/dev/null
           ua_psql "$PORT" "bench_$c" -f "$BENCH/quota_setup.sql" >/dev/null
           [ "$c" = usage_agg ] || ua_psql "$PORT" "bench_$c" -f "$BENCH/quota_$c.sql" >/dev/null ;;
    esac
done

# run LABEL CONTENDER SCRIPT: appends "LABEL CONTENDER tps p50 p99 wal_per_call errors round".
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
    echo "$label $c ${tps:-0} $pct $wal ${errors:-0} $round" >>"$RAW"
    ua_log "$label $c: ${tps:-0} tps, p50/p99 $pct ms, $wal WAL bytes/call, ${errors:-0} errors"
    rm -rf "$dir"
}

for round in $(seq 1 "$ROUNDS"); do
    for w in $WORKLOADS; do
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
# The machine drifts by tens of percent within minutes: the ratio of two
# contenders is taken within each round (runs seconds apart), then the median
# and the range of those ratios over the rounds.
round_ratios() {  # round_ratios LABEL CONTENDER: "median (min-max)" of tps / hand-written tps
    awk -v l="$1" -v c="$2" '$1 == l && $2 == c {t[$8] = $3} $1 == l && $2 == "handwritten" {h[$8] = $3}
        END {for (r in t) if (h[r] > 0) print t[r] / h[r]}' "$RAW" | sort -g \
        | awk '{a[NR] = $1} END {printf "%.2fx (%.2f-%.2f)", a[int((NR + 1) / 2)], a[1], a[NR]}'
}
{
    echo "# Quota step: usage_agg, flattened lever, hand-written function"
    echo
    echo "- command: \`BENCH_SECONDS=$SECONDS_PER_RUN BENCH_ROUNDS=$ROUNDS bash bench/quota.sh\`"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)); $("${UA_PG_BIN}/postgres" --version); commit $(git -C "$UA_ROOT" rev-parse --short HEAD)"
    echo "- pgbench -M prepared, $CLIENTS clients, ${SECONDS_PER_RUN} s per run, $ROUNDS interleaved rounds; shared_buffers 1GB, fsync and synchronous_commit on"
    echo "- vs hand-written: the median over rounds of tps / hand-written tps within the same round (range in brackets); tps, latencies and WAL: medians over rounds"
    echo
    echo "| workload | contender | tps | vs hand-written | p50 ms | p99 ms | WAL bytes/call |"
    echo "|---|---|---|---|---|---|---|"
    for w in $WORKLOADS; do
        for c in "${CONTENDERS[@]}"; do
            echo "| consume_$w | $c | $(median "consume_$w" "$c" 3) | $(round_ratios "consume_$w" "$c") | $(median "consume_$w" "$c" 4) | $(median "consume_$w" "$c" 5) | $(median "consume_$w" "$c" 6) |"
        done
    done
    echo
    echo "Raw runs (label contender tps p50 p99 wal_per_call errors round):"
    echo
    sed 's/^/    /' "$RAW"
} >"$OUT"
cat "$OUT"
