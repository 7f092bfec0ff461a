#!/usr/bin/env bash
# The usage_agg benchmark suite. Starts a cluster of its own, loads the
# contenders side by side, runs every workload in rounds (each round runs every
# contender in turn, so machine noise hits all of them alike) and prints a table
# of medians and ratios, written to $BENCH_OUT.
#
# Contenders (one database each, same table and indexes):
#   bare      key_usage_logs with no aggregation (the physical limit)
#   usage_agg usage_agg, config.fold_mode = 'immediate' (the 0.2.0 default; the
#             0.3.0 default, the asynchronous fold, is measured by bench/fold.sh)
#   deferred  usage_agg, config.fold_mode = 'async' (called 'deferred' before 0.3.0)
#   plpgsql   a hand-written row-level PL/pgSQL trigger, same JSONB layout (plpgsql_trigger.sql)
#   empty_trigger  bare plus a statement trigger with a transition table that does
#             nothing (empty_trigger.sql): the floor of any trigger-based fold
#
#   bash bench/run.sh                                   # everything, defaults below
#   BENCH_WORKLOADS="single hot" BENCH_SECONDS=10 bash bench/run.sh
source "$(dirname "$0")/../scripts/lib.sh"
ua_setup
ua_install_extension

BENCH="$UA_ROOT/bench"
PORT="${USAGE_AGG_BENCH_PORT:-28817}"
CLIENTS="${BENCH_CLIENTS:-1 4 16}"
SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
ROUNDS="${BENCH_ROUNDS:-3}"
BULK_ROUNDS="${BENCH_BULK_ROUNDS:-1}"
WORKLOADS="${BENCH_WORKLOADS:-single hot bulk quota reads cleanup}"
READ_ROWS_M="${BENCH_READ_ROWS_M:-10}"          # millions of detail rows for the read workload
CLEANUP_SECONDS="${BENCH_CLEANUP_SECONDS:-90}"  # insert load around the 1M-row cleanup
OUT="${BENCH_OUT:-$BENCH/results/latest.md}"
CONTENDERS=(bare usage_agg deferred plpgsql empty_trigger)
TMP="$(mktemp -d)"
chmod 755 "$TMP"
RAW="$TMP/raw"
touch "$RAW"
mkdir -p "$(dirname "$OUT")"
STARTED_AT=$(date +%s)

has() { [[ " $WORKLOADS " == *" $1 "* ]]; }

ua_log "benchmark cluster on port ${PORT}"
ua_cluster_start bench "$PORT" "shared_buffers = '1GB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'"
trap 'ua_cluster_stop bench; rm -rf "$TMP"' EXIT

for c in "${CONTENDERS[@]}"; do
    ua_psql "$PORT" postgres -c "CREATE DATABASE bench_$c" >/dev/null
    ua_psql "$PORT" "bench_$c" -c "CREATE EXTENSION usage_agg" >/dev/null
done
ua_psql "$PORT" bench_bare -f "$BENCH/bare.sql" >/dev/null
ua_psql "$PORT" bench_plpgsql -f "$BENCH/plpgsql_trigger.sql" >/dev/null
ua_psql "$PORT" bench_empty_trigger -f "$BENCH/bare.sql" -f "$BENCH/empty_trigger.sql" >/dev/null
ua_psql "$PORT" bench_deferred -c "UPDATE usage_agg.config SET fold_mode = 'deferred'" >/dev/null

reset_tables() {
    ua_psql "$PORT" "bench_$1" \
        -c "TRUNCATE usage_agg.key_usage_logs, usage_agg.daily_logs, usage_agg.monthly_logs, usage_agg.pending_deltas" \
        -c "UPDATE usage_agg.retention_horizon SET detail_kept_from = '-infinity', daily_kept_from = '-infinity'" \
        -c "VACUUM ANALYZE usage_agg.key_usage_logs, usage_agg.daily_logs" -c "CHECKPOINT" >/dev/null
}

# check_fold CONTENDER DAYS_BACK WHEN: verify_daily_logs over the last DAYS_BACK
# days must find no difference.
check_fold() {
    local bad
    bad=$(ua_psql "$PORT" "bench_$1" -At -c "SELECT count(*) FROM usage_agg.verify_daily_logs(current_date - $2, current_date + 1)")
    [ "$bad" = "0" ] || { echo "verify_daily_logs found $bad differences $3 in bench_$1" >&2; exit 1; }
}

# check_and_empty CONTENDER WHEN: after an insert run, checks usage_agg's fold
# and empties the tables at once; rows left behind would be autovacuumed while
# the next contender runs (a million after a bulk load).
check_and_empty() {
    case "$1" in usage_agg | deferred) check_fold "$1" 3 "$2" ;; esac
    reset_tables "$1"
}

deadlocks() { ua_psql "$PORT" postgres -At -c "SELECT sum(deadlocks) FROM pg_stat_database"; }

# run_pgbench LABEL CONTENDER CLIENTS SCRIPT: appends
# "LABEL CONTENDER tps p50_ms p99_ms errors" to $RAW (per-transaction pgbench log).
run_pgbench() {
    local label="$1" c="$2" n="$3" script="$4" dir
    local jobs=$(( n < 2 ? n : 2 ))
    dir="$(mktemp -d -p "$TMP")"
    (cd "$dir" && "${UA_PG_BIN}/pgbench" -n -M prepared -c "$n" -j "$jobs" -T "$SECONDS_PER_RUN" -l --log-prefix=tx \
        -h 127.0.0.1 -p "$PORT" -U postgres -f "$script" "bench_$c" >out 2>&1) || true
    local tps errors pct
    tps=$(awk '/^tps = / {print $3; exit}' "$dir/out")
    local aborted failed
    aborted=$(grep -c "aborted in command" "$dir/out" || true)
    failed=$(awk '/number of failed transactions/ {print $5; exit}' "$dir/out" | tr -dc 0-9)
    errors=$(( ${aborted:-0} + ${failed:-0} ))
    pct=$(cat "$dir"/tx.* | awk '{print $3 / 1000}' | sort -g \
          | awk '{a[NR] = $1} END {printf "%.3f %.3f", a[int(NR * 0.5) + 1], a[int(NR * 0.99) + 1]}')
    echo "$label $c ${tps:-0} $pct $errors" >>"$RAW"
    ua_log "$label $c: ${tps:-0} tps, p50/p99 $pct ms, $errors errors"
    rm -rf "$dir"
}

# Deferred mode leaves calls pending: fold them and record the cost, so that the
# table shows what deferral postpones.
apply_pending() {  # apply_pending LABEL
    local out ms rows
    out=$(ua_psql "$PORT" bench_deferred -At -c '\timing on' -c "SELECT usage_agg.apply_pending_deltas()")
    rows=$(echo "$out" | head -1)
    ms=$(echo "$out" | awk '/^Time: / {print $2; exit}')
    echo "apply_$1 deferred $ms $rows" >>"$RAW"
}

# ---------------------------------------------------------------------------
if has single || has hot; then
    before=$(deadlocks)
    for round in $(seq 1 "$ROUNDS"); do
        for n in $CLIENTS; do
            has single || break
            for c in "${CONTENDERS[@]}"; do
                reset_tables "$c"
                run_pgbench "single_$n" "$c" "$n" "$BENCH/insert_one.pgbench"
                [ "$c" = deferred ] && apply_pending "single_$n"
                check_and_empty "$c" "after the single-row runs"
            done
        done
        if has hot; then
            for c in "${CONTENDERS[@]}"; do
                reset_tables "$c"
                run_pgbench hot_16 "$c" 16 "$BENCH/insert_hot_user.pgbench"
                [ "$c" = deferred ] && apply_pending hot_16
                check_and_empty "$c" "after the hot-user runs"
            done
        fi
    done
    DEADLOCKS_INSERTS=$(( $(deadlocks) - before ))
fi

# ---------------------------------------------------------------------------
if has bulk; then
    ua_psql "$PORT" bench_bare -At -f "$BENCH/copy_1m.sql" >"$TMP/copy_1m.csv"
    for round in $(seq 1 "$BULK_ROUNDS"); do
        for c in "${CONTENDERS[@]}"; do
            reset_tables "$c"
            ms=$(ua_psql "$PORT" "bench_$c" -c '\timing on' -f "$BENCH/bulk_1m.sql" | awk '/^Time: / {print $2; exit}')
            echo "bulk_insert $c $ms" >>"$RAW"
            ua_log "round $round: 1,000,000-row INSERT ... SELECT, $c: $ms ms"
            reset_tables "$c"
            t0=$(date +%s%N)
            ua_psql "$PORT" "bench_$c" -c "\\copy usage_agg.key_usage_logs (user_id, shared_key_id, api_endpoint, model_used, tokens_used, cost_estimate, success, created_at) FROM '$TMP/copy_1m.csv' WITH (FORMAT csv)" >/dev/null
            ms=$(( ($(date +%s%N) - t0) / 1000000 ))
            echo "bulk_copy $c $ms" >>"$RAW"
            ua_log "round $round: 1,000,000-row COPY, $c: $ms ms"
            check_and_empty "$c" "after the bulk load"
        done
    done
    rm -f "$TMP/copy_1m.csv"
fi

# ---------------------------------------------------------------------------
if has quota; then
    ua_psql "$PORT" bench_usage_agg -f "$BENCH/quota_setup.sql" >/dev/null
    for round in $(seq 1 "$ROUNDS"); do
        run_pgbench consume_many usage_agg 16 "$BENCH/consume_many.pgbench"
        run_pgbench consume_one usage_agg 16 "$BENCH/consume_one.pgbench"
    done
    bad=$(ua_psql "$PORT" bench_usage_agg -At -c "SELECT count(*) FROM usage_agg.quotas q
            WHERE q.monthly_used <> (SELECT coalesce(sum(amount), 0) FROM usage_agg.quota_usage_logs l WHERE l.user_id = q.user_id)")
    [ "$bad" = "0" ] || { echo "quota accounting disagrees for $bad users" >&2; exit 1; }
fi

# ---------------------------------------------------------------------------
# Reads with 1M and then READ_ROWS_M million detail rows present: usage_agg's
# reads (aggregates only) against the same summary summed over the detail.
if has reads; then
    for c in usage_agg bare; do reset_tables "$c"; done
    loaded=0
    for target in 1 "$READ_ROWS_M"; do
        while [ "$loaded" -lt "$target" ]; do
            for c in usage_agg bare; do ua_psql "$PORT" "bench_$c" -f "$BENCH/history_1m.sql" >/dev/null; done
            loaded=$((loaded + 1))
            ua_log "read history: ${loaded}M detail rows"
        done
        for c in usage_agg bare; do ua_psql "$PORT" "bench_$c" -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null; done
        for round in $(seq 1 "$ROUNDS"); do
            run_pgbench "read_summary_${target}m" usage_agg 1 "$BENCH/read_summary.pgbench"
            run_pgbench "read_limit_${target}m" usage_agg 1 "$BENCH/read_limit.pgbench"
            run_pgbench "read_summary_${target}m" bare 1 "$BENCH/read_detail.pgbench"
        done
        [ "$target" = "$READ_ROWS_M" ] && break
    done
fi

# ---------------------------------------------------------------------------
# Insert latency while cleanup_old_key_usage_logs() removes 1,000,000 expired
# rows, against the same load without a cleanup: single-row inserts, 4 clients,
# percentiles over the cleanup's time window (the same window, measured from
# pgbench's start, for the run without cleanup).
latency_stats() {  # latency_stats LOGDIR FROM_EPOCH TO_EPOCH -> "tps p50 p99 max" (ms)
    local span; span=$(awk -v a="$2" -v b="$3" 'BEGIN { print b - a }')
    cat "$1"/tx.* | awk -v from="$2" -v to="$3" '{ t = $5 + $6 / 1e6; if (t >= from && t <= to) print $3 / 1000 }' \
        | sort -g | awk -v span="$span" '{ a[NR] = $1 }
            END { printf "%.0f %.2f %.2f %.2f\n", NR / span, a[int(NR * 0.5) + 1], a[int(NR * 0.99) + 1], a[NR] }'
}
if has cleanup; then
    ua_log "loading 1,000,000 expired rows (folded as they go in)"
    reset_tables usage_agg
    ua_psql "$PORT" bench_usage_agg -f "$BENCH/expired_1m.sql" -c "VACUUM ANALYZE usage_agg.key_usage_logs" -c "CHECKPOINT" >/dev/null
    CLEANUP_WINDOW=""
    for mode in with_cleanup without_cleanup; do
        logdir="$(mktemp -d -p "$TMP")"
        (cd "$logdir" && exec "${UA_PG_BIN}/pgbench" -n -M prepared -c 4 -j 2 -T "$CLEANUP_SECONDS" -l --log-prefix=tx \
            -h 127.0.0.1 -p "$PORT" -U postgres -f "$BENCH/insert_one.pgbench" bench_usage_agg >pgbench.out 2>&1) &
        pgbench_pid=$!
        started=$(date +%s.%N)
        sleep 5
        if [ "$mode" = with_cleanup ]; then
            t0=$(date +%s.%N)
            CLEANUP_ROWS=$(ua_psql "$PORT" bench_usage_agg -At -c "SELECT usage_agg.cleanup_old_key_usage_logs()" 2>/dev/null)
            t1=$(date +%s.%N)
            CLEANUP_WINDOW="$(awk -v a="$t0" -v b="$t1" -v s="$started" 'BEGIN { printf "%.3f %.3f", a - s, b - s }')"
        fi
        wait "$pgbench_pid"
        read -r off_from off_to <<<"$CLEANUP_WINDOW"
        if awk -v t="$off_to" -v T="$CLEANUP_SECONDS" 'BEGIN { exit !(t > T - 1) }'; then
            echo "the cleanup outlasted the insert load; raise BENCH_CLEANUP_SECONDS" >&2; exit 1
        fi
        from=$(awk -v s="$started" -v o="$off_from" 'BEGIN { printf "%.3f", s + o }')
        to=$(awk -v s="$started" -v o="$off_to" 'BEGIN { printf "%.3f", s + o }')
        echo "cleanup_$mode usage_agg $(latency_stats "$logdir" "$from" "$to")" >>"$RAW"
        ua_log "$mode: $(tail -1 "$RAW")"
    done
    CLEANUP_SECONDS_TAKEN=$(awk -v w="$CLEANUP_WINDOW" 'BEGIN { split(w, x, " "); printf "%.1f", x[2] - x[1] }')
    check_fold usage_agg 100 "after the cleanup run"
fi

# ---------------------------------------------------------------------------
median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print ""; else print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
get() { awk -v w="$1" -v c="$2" -v f="${3:-3}" '$1==w && $2==c {print $f}' "$RAW" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
fmt() { awk -v v="$1" -v d="${2:-0}" 'BEGIN { if (v == "") print "-"; else printf "%.*f", d, v }'; }

{
    echo "# usage_agg benchmark"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), took $(( ($(date +%s) - STARTED_AT) / 60 )) min"
    echo "- machine: $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $(uname -srm)"
    echo "- server: $("${UA_PG_BIN}/postgres" --version), shared_buffers=1GB, max_wal_size=4GB, checkpoint_timeout=30min, fsync and synchronous_commit on; pgbench on the same machine"
    echo "- command: \`BENCH_WORKLOADS=\"$WORKLOADS\" BENCH_CLIENTS=\"$CLIENTS\" BENCH_SECONDS=$SECONDS_PER_RUN BENCH_ROUNDS=$ROUNDS BENCH_BULK_ROUNDS=$BULK_ROUNDS BENCH_READ_ROWS_M=$READ_ROWS_M bash bench/run.sh\`"
    echo "- pgbench -M prepared, ${SECONDS_PER_RUN} s per run, 10,000 users, 20 keys, 3 models; medians of $ROUNDS rounds (bulk: $BULK_ROUNDS); latencies from per-transaction logs"
    echo
    if has single || has hot || has bulk; then
    echo "| workload | bare | usage_agg (immediate) | usage_agg (deferred) | PL/pgSQL trigger | empty trigger | immediate / bare | deferred / bare | immediate / PL/pgSQL | deferred / PL/pgSQL | deferred / empty trigger |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    rows=()
    has single && for n in $CLIENTS; do rows+=("single_$n|single-row insert, $n clients"); done
    has hot && rows+=("hot_16|one hot user, 16 clients")
    for r in "${rows[@]}"; do
        w="${r%%|*}"; name="${r#*|}"
        b=$(get "$w" bare); u=$(get "$w" usage_agg); d=$(get "$w" deferred); p=$(get "$w" plpgsql); e=$(get "$w" empty_trigger)
        echo "| $name: tps | $(fmt "$b") | $(fmt "$u") | $(fmt "$d") | $(fmt "$p") | $(fmt "$e") | $(ratio "$u" "$b") | $(ratio "$d" "$b") | $(ratio "$u" "$p") | $(ratio "$d" "$p") | $(ratio "$d" "$e") |"
        echo -n "| $name: p50 / p99 ms |"
        for c in bare usage_agg deferred plpgsql empty_trigger; do echo -n " $(fmt "$(get "$w" "$c" 4)" 2) / $(fmt "$(get "$w" "$c" 5)" 2) |"; done
        echo " | | | | |"
    done
    if has bulk; then
        for w in "bulk_insert|1,000,000-row INSERT ... SELECT: ms" "bulk_copy|1,000,000-row COPY: ms"; do
            k="${w%%|*}"; name="${w#*|}"
            b=$(get "$k" bare); u=$(get "$k" usage_agg); d=$(get "$k" deferred); p=$(get "$k" plpgsql); e=$(get "$k" empty_trigger)
            echo "| $name (lower is better) | $(fmt "$b") | $(fmt "$u") | $(fmt "$d") | $(fmt "$p") | $(fmt "$e") | $(ratio "$u" "$b") | $(ratio "$d" "$b") | $(ratio "$u" "$p") | $(ratio "$d" "$p") | $(ratio "$d" "$e") |"
        done
    fi
    echo
    errors_of() { awk -v c="$1" '$1 ~ /^(single|hot)/ && $2 == c {s += $6} END {print s + 0}' "$RAW"; }
    echo "Errors (failed or aborted pgbench transactions) across all insert runs: bare $(errors_of bare), usage_agg $(errors_of usage_agg), deferred $(errors_of deferred), PL/pgSQL $(errors_of plpgsql), empty trigger $(errors_of empty_trigger); deadlocks reported by the server: ${DEADLOCKS_INSERTS:-n/a}."
    if grep -q '^apply_' "$RAW"; then
        echo
        echo "Deferred mode postpones work: \`apply_pending_deltas()\` after the runs (median ms / calls applied):"
        for w in $(awk '$1 ~ /^apply_/ {print $1}' "$RAW" | sort -u); do
            echo "- ${w#apply_}: $(fmt "$(get "$w" deferred 3)") ms for $(fmt "$(get "$w" deferred 4)") calls"
        done
    fi
    fi
    if has quota; then
    echo
    echo "| quota workload (16 clients) | usage_agg tps | p50 / p99 ms |"
    echo "|---|---:|---:|"
    echo "| consume_quota, 10,000 users | $(fmt "$(get consume_many usage_agg)") | $(fmt "$(get consume_many usage_agg 4)" 2) / $(fmt "$(get consume_many usage_agg 5)" 2) |"
    echo "| consume_quota, all clients on one user | $(fmt "$(get consume_one usage_agg)") | $(fmt "$(get consume_one usage_agg 4)" 2) / $(fmt "$(get consume_one usage_agg 5)" 2) |"
    fi
    if has reads; then
    echo
    echo "| read (1 client, latency of the whole round trip) | detail rows | usage_agg p50 / p99 ms | usage_agg tps | summed over the detail p50 / p99 ms | detail tps |"
    echo "|---|---:|---:|---:|---:|---:|"
    for m in 1 "$READ_ROWS_M"; do
        echo "| usage_summary | ${m}M | $(fmt "$(get "read_summary_${m}m" usage_agg 4)" 3) / $(fmt "$(get "read_summary_${m}m" usage_agg 5)" 3) | $(fmt "$(get "read_summary_${m}m" usage_agg)") | $(fmt "$(get "read_summary_${m}m" bare 4)" 3) / $(fmt "$(get "read_summary_${m}m" bare 5)" 3) | $(fmt "$(get "read_summary_${m}m" bare)") |"
        echo "| check_usage_limit | ${m}M | $(fmt "$(get "read_limit_${m}m" usage_agg 4)" 3) / $(fmt "$(get "read_limit_${m}m" usage_agg 5)" 3) | $(fmt "$(get "read_limit_${m}m" usage_agg)") | | |"
        [ "$m" = "$READ_ROWS_M" ] && break
    done
    fi
    if has cleanup; then
    echo
    echo "Single-row inserts (4 clients, usage_agg) while \`cleanup_old_key_usage_logs()\` removes $CLEANUP_ROWS expired rows"
    echo "(it took ${CLEANUP_SECONDS_TAKEN} s), against the same ${CLEANUP_SECONDS_TAKEN} s window of the same load without a cleanup:"
    echo
    echo "| insert load | tps | p50 ms | p99 ms | max ms |"
    echo "|---|---:|---:|---:|---:|"
    awk '$1 ~ /^cleanup_/ { sub("cleanup_", "", $1); gsub("_", " ", $1); printf "| %s | %s | %s | %s | %s |\n", $1, $3, $4, $5, $6 }' "$RAW"
    fi
    echo
    echo "<details><summary>raw results</summary>"
    echo
    echo '```'
    cat "$RAW"
    echo '```'
    echo "</details>"
} | tee "$OUT"
ua_log "written to $OUT"
