#!/usr/bin/env bash
# Benchmark: bare table vs usage_agg vs a hand-written PL/pgSQL trigger, side by
# side in one run, on a cluster of its own. Each round runs every contender in
# turn, so machine noise hits all of them alike; the table reports medians.
#
#   bash bench/run.sh                     # defaults below
#   BENCH_CLIENTS="1 4 16" BENCH_SECONDS=20 BENCH_ROUNDS=3 bash bench/run.sh
source "$(dirname "$0")/../scripts/lib.sh"
ua_setup
ua_install_extension

BENCH="$UA_ROOT/bench"
PORT="${USAGE_AGG_BENCH_PORT:-28817}"
CLIENTS="${BENCH_CLIENTS:-4}"
SECONDS_PER_RUN="${BENCH_SECONDS:-15}"
ROUNDS="${BENCH_ROUNDS:-3}"
CONTENDERS=(bare usage_agg plpgsql)
WORKLOADS="${BENCH_WORKLOADS:-fold quota cleanup}"   # which parts to run
CLEANUP_SECONDS="${BENCH_CLEANUP_SECONDS:-90}"   # insert load around the 1M-row cleanup
OUT="${BENCH_OUT:-$BENCH/results/latest.md}"
RAW="$(mktemp)"
mkdir -p "$(dirname "$OUT")"

ua_log "benchmark cluster on port ${PORT}"
ua_cluster_start bench "$PORT" "shared_buffers = '1GB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'"
trap 'ua_cluster_stop bench; rm -f "$RAW"' EXIT

for c in "${CONTENDERS[@]}"; do
    ua_psql "$PORT" postgres -c "CREATE DATABASE bench_$c" >/dev/null
    ua_psql "$PORT" "bench_$c" -c "CREATE EXTENSION usage_agg" >/dev/null
done
ua_psql "$PORT" bench_bare -f "$BENCH/bare.sql" >/dev/null
ua_psql "$PORT" bench_plpgsql -f "$BENCH/plpgsql_trigger.sql" >/dev/null

reset_tables() {
    ua_psql "$PORT" "bench_$1" -c "TRUNCATE usage_agg.key_usage_logs, usage_agg.daily_logs, usage_agg.monthly_logs" \
        -c "UPDATE usage_agg.retention_horizon SET detail_kept_from = '-infinity', daily_kept_from = '-infinity'" \
        -c "CHECKPOINT" >/dev/null
}

run_fold=false; run_quota=false; run_cleanup=false
for w in $WORKLOADS; do
    case "$w" in fold) run_fold=true ;; quota) run_quota=true ;; cleanup) run_cleanup=true ;; esac
done

pgbench_tps() {  # pgbench_tps DB CLIENTS SCRIPT
    local jobs=$(( $2 < 2 ? $2 : 2 ))
    "${UA_PG_BIN}/pgbench" -n -M prepared -c "$2" -j "$jobs" -T "$SECONDS_PER_RUN" \
        -h 127.0.0.1 -p "$PORT" -U postgres -f "$3" "$1" 2>&1 | awk '/^tps = / {print $3; exit}'
}

if $run_quota; then
    ua_psql "$PORT" bench_usage_agg -f "$BENCH/quota_setup.sql" >/dev/null
    for round in $(seq 1 "$ROUNDS"); do
        for script in consume_many consume_one; do
            tps=$(pgbench_tps bench_usage_agg 16 "$BENCH/$script.pgbench")
            echo "$script usage_agg $tps" >>"$RAW"
            ua_log "round $round: $script, 16 clients: $tps tps"
        done
    done
    # Three-way agreement after the storm.
    bad=$(ua_psql "$PORT" bench_usage_agg -At -c "SELECT count(*) FROM usage_agg.quotas q
            WHERE q.monthly_used <> (SELECT coalesce(sum(amount), 0) FROM usage_agg.quota_usage_logs l WHERE l.user_id = q.user_id)")
    [ "$bad" = "0" ] || { echo "quota accounting disagrees for $bad users" >&2; exit 1; }
fi

# Insert latency while cleanup_old_key_usage_logs() removes 1,000,000 expired rows,
# against the same load without a cleanup. Single-row inserts, 4 clients, per-
# transaction pgbench logs; percentiles over the cleanup's time window (the same
# window, measured from pgbench's start, for the run without cleanup).
latency_stats() {  # latency_stats LOGDIR FROM_EPOCH TO_EPOCH -> "tps p50 p99 max" (ms)
    local span; span=$(awk -v a="$2" -v b="$3" 'BEGIN { print b - a }')
    cat "$1"/tx.* | awk -v from="$2" -v to="$3" '{ t = $5 + $6 / 1e6; if (t >= from && t <= to) print $3 / 1000 }' \
        | sort -g | awk -v span="$span" '{ a[NR] = $1 }
            END { printf "%.0f %.2f %.2f %.2f\n", NR / span, a[int(NR * 0.5) + 1], a[int(NR * 0.99) + 1], a[NR] }'
}
if $run_cleanup; then
    ua_log "loading 1,000,000 expired rows (folded as they go in)"
    reset_tables usage_agg
    ua_psql "$PORT" bench_usage_agg -f "$BENCH/expired_1m.sql" -c "VACUUM ANALYZE usage_agg.key_usage_logs" -c "CHECKPOINT" >/dev/null
    CLEANUP_WINDOW=""
    for mode in with_cleanup without_cleanup; do
        logdir="$(mktemp -d)"
        (cd "$logdir" && exec "${UA_PG_BIN}/pgbench" -n -M prepared -c 4 -j 2 -T "$CLEANUP_SECONDS" -l --log-prefix=tx \
            -h 127.0.0.1 -p "$PORT" -U postgres -f "$BENCH/insert_one.pgbench" bench_usage_agg >pgbench.out 2>&1) &
        pgbench_pid=$!
        started=$(date +%s.%N)
        sleep 5
        if [ "$mode" = with_cleanup ]; then
            t0=$(date +%s.%N)
            removed=$(ua_psql "$PORT" bench_usage_agg -At -c "SELECT usage_agg.cleanup_old_key_usage_logs()" 2>/dev/null)
            t1=$(date +%s.%N)
            CLEANUP_WINDOW="$(awk -v a="$t0" -v b="$t1" -v s="$started" 'BEGIN { printf "%.3f %.3f", a - s, b - s }')"
            ua_log "cleanup removed $removed rows in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
            CLEANUP_ROWS="$removed"
        fi
        wait "$pgbench_pid"
        read -r off_from off_to <<<"$CLEANUP_WINDOW"
        if awk -v t="$off_to" -v T="$CLEANUP_SECONDS" 'BEGIN { exit !(t > T - 1) }'; then
            echo "the cleanup outlasted the insert load; raise BENCH_CLEANUP_SECONDS" >&2; exit 1
        fi
        from=$(awk -v s="$started" -v o="$off_from" 'BEGIN { printf "%.3f", s + o }')
        to=$(awk -v s="$started" -v o="$off_to" 'BEGIN { printf "%.3f", s + o }')
        echo "cleanup_$mode $(latency_stats "$logdir" "$from" "$to")" >>"$RAW"
        ua_log "$mode: $(tail -1 "$RAW")"
        rm -rf "$logdir"
    done
    CLEANUP_SECONDS_TAKEN=$(awk -v w="$CLEANUP_WINDOW" 'BEGIN { split(w, x, " "); printf "%.1f", x[2] - x[1] }')
    bad=$(ua_psql "$PORT" bench_usage_agg -At -c "SELECT count(*) FROM usage_agg.verify_daily_logs(current_date - 100, current_date + 1)")
    [ "$bad" = "0" ] || { echo "verify_daily_logs found $bad differences after the cleanup run" >&2; exit 1; }
fi

for round in $(seq 1 "$ROUNDS"); do
    $run_fold || break
    for n in $CLIENTS; do
        for c in "${CONTENDERS[@]}"; do
            reset_tables "$c"
            jobs=$(( n < 2 ? n : 2 ))
            tps=$("${UA_PG_BIN}/pgbench" -n -M prepared -c "$n" -j "$jobs" -T "$SECONDS_PER_RUN" \
                    -h 127.0.0.1 -p "$PORT" -U postgres -f "$BENCH/insert_one.pgbench" "bench_$c" 2>&1 \
                  | awk '/^tps = / {print $3; exit}')
            echo "single_$n $c $tps" >>"$RAW"
            ua_log "round $round: single-row inserts, $n clients, $c: $tps tps"
        done
    done
    for c in "${CONTENDERS[@]}"; do
        reset_tables "$c"
        ms=$(ua_psql "$PORT" "bench_$c" -c '\timing on' -f "$BENCH/bulk_200k.sql" \
             | awk '/^Time: / {print $2; exit}')
        echo "bulk_200k $c $ms" >>"$RAW"
        ua_log "round $round: 200,000-row INSERT ... SELECT, $c: $ms ms"
    done
done

# A bulk load leaves the aggregate exact: checked, not assumed.
$run_fold && bad=$(ua_psql "$PORT" bench_usage_agg -At -c "SELECT count(*) FROM usage_agg.verify_daily_logs(current_date - 3, current_date + 1)")
$run_fold && { [ "$bad" = "0" ] || { echo "verify_daily_logs found $bad differences after the bulk load" >&2; exit 1; }; }

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
get() { awk -v w="$1" -v c="$2" '$1==w && $2==c {print $3}' "$RAW" | median; }

{
    echo "# usage_agg benchmark"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $(uname -srm)"
    echo "- server: $("${UA_PG_BIN}/postgres" --version), shared_buffers=1GB, max_wal_size=4GB, fsync/synchronous_commit on (defaults)"
    echo "- command: \`BENCH_WORKLOADS=\"$WORKLOADS\" BENCH_CLIENTS=\"$CLIENTS\" BENCH_SECONDS=$SECONDS_PER_RUN BENCH_ROUNDS=$ROUNDS bash bench/run.sh\`"
    $run_fold && echo "- single-row: pgbench -M prepared, ${SECONDS_PER_RUN}s per run, 10,000 users, 4 keys, 3 models; median of $ROUNDS rounds"
    $run_fold && echo "- bulk: one INSERT ... SELECT of 200,000 rows over 10,000 users and 3 days; median of $ROUNDS rounds"
    echo
    if $run_fold; then
    echo "| workload | bare | usage_agg | PL/pgSQL trigger | usage_agg / bare | usage_agg / PL/pgSQL |"
    echo "|---|---:|---:|---:|---:|---:|"
    for n in $CLIENTS; do
        b=$(get "single_$n" bare); u=$(get "single_$n" usage_agg); p=$(get "single_$n" plpgsql)
        awk -v n="$n" -v b="$b" -v u="$u" -v p="$p" 'BEGIN {
            printf "| single-row insert, %d clients (tps, higher is better) | %.0f | %.0f | %.0f | %.2fx | %.2fx |\n", n, b, u, p, u/b, u/p }'
    done
    b=$(get bulk_200k bare); u=$(get bulk_200k usage_agg); p=$(get bulk_200k plpgsql)
    awk -v b="$b" -v u="$u" -v p="$p" 'BEGIN {
        printf "| 200,000-row INSERT ... SELECT (ms, lower is better) | %.0f | %.0f | %.0f | %.2fx time | %.2fx time |\n", b, u, p, u/b, u/p }'
    fi
    if $run_quota; then
    echo
    echo "| quota workload (16 clients, pgbench -M prepared) | usage_agg tps |"
    echo "|---|---:|"
    echo "| consume_quota, 10,000 users | $(get consume_many usage_agg | awk '{printf "%.0f", $1}') |"
    echo "| consume_quota, all clients on one user | $(get consume_one usage_agg | awk '{printf "%.0f", $1}') |"
    fi
    if $run_cleanup; then
    echo
    echo "Single-row inserts (4 clients, usage_agg) while \`cleanup_old_key_usage_logs()\` removes $CLEANUP_ROWS expired rows"
    echo "(it took ${CLEANUP_SECONDS_TAKEN} s), against the same ${CLEANUP_SECONDS_TAKEN} s window of the same load without a cleanup:"
    echo
    echo "| insert load | tps | p50 ms | p99 ms | max ms |"
    echo "|---|---:|---:|---:|---:|"
    awk '$1 ~ /^cleanup_/ { sub("cleanup_", "", $1); gsub("_", " ", $1); printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }' "$RAW"
    fi
} | tee "$OUT"
ua_log "written to $OUT"
