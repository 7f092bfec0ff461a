#!/usr/bin/env bash
# The insert benchmark of the asynchronous fold (issue: the fold, asynchronous
# by default). One cluster per server configuration, usage_agg preloaded so the
# background applier runs *during* every run of the default mode; contenders in
# turn within each round, so machine noise hits all of them alike.
#
# Contenders (one database each, the same table with the same indexes):
#   bare       key_usage_logs with no aggregation (the physical limit)
#   default    usage_agg as installed: fold_mode auto, the applier running
#   nokeys     the same build and mode with usage_agg.per_key_aggregates = off:
#              what the per-key and service aggregates cost (0.4.0)
#   nohours    the same build and mode with usage_agg.hourly_aggregates = off:
#              what the hourly tier costs (0.4.0)
#   immediate  usage_agg, fold_mode = 'immediate'
#   plpgsql    a hand-written row-level PL/pgSQL trigger (plpgsql_trigger.sql)
#   empty      bare plus a statement trigger with a transition table that does
#              nothing: the floor of any trigger-based fold
#   budgets    default with a daily cost limit and a monthly budget on every
#              user's plan (never reached): what the cost alert checks and the
#              per-month turn-taking cost the applier
#   immediate_budgets  immediate with the same limits: what they cost the
#              inserting statement
#   priced     default, but every call reports input and output tokens and no
#              cost, and is priced from usage_agg.model_prices by the pricing
#              trigger (insert_priced.pgbench instead of insert_one.pgbench in
#              the single-row runs): what token kinds and table prices cost
#
# Per run: tps, p50/p99 latency, errors, WAL bytes per call (pg_current_wal_lsn
# before the run and after the applier has drained, so the applier's own WAL
# counts), and for the default mode the age of the oldest pending call sampled
# every 100 ms (p50/p99/max) and the time the backlog takes to drain.
#
#   bash bench/fold.sh
#   BENCH_CONFIGS=tuned BENCH_ROUNDS=1 BENCH_WORKLOADS="single" bash bench/fold.sh
source "$(dirname "$0")/../scripts/lib.sh"
ua_setup
ua_install_extension

BENCH="$UA_ROOT/bench"
PORT="${USAGE_AGG_BENCH_PORT:-28817}"
CLIENTS="${BENCH_CLIENTS:-1 4 16}"
SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
ROUNDS="${BENCH_ROUNDS:-3}"
BULK_ROUNDS="${BENCH_BULK_ROUNDS:-1}"
CONFIGS="${BENCH_CONFIGS:-tuned stock}"
WORKLOADS="${BENCH_WORKLOADS:-single hot_user hot_key bulk intervals}"
INTERVALS="${BENCH_INTERVALS:-0.1 0.5 1 5}"
OUT="${BENCH_OUT:-$BENCH/results/fold-latest.md}"
CONTENDERS=(${BENCH_CONTENDERS:-bare default nokeys nohours immediate plpgsql empty budgets immediate_budgets})
# The columns of the main table (the budget contenders have a table of their own).
MAIN_CONTENDERS=(bare default nokeys immediate plpgsql empty)
TMP="$(mktemp -d)"
chmod 755 "$TMP"
RAW="$TMP/raw"
touch "$RAW"
mkdir -p "$(dirname "$OUT")"
STARTED_AT=$(date +%s)
has() { [[ " $WORKLOADS " == *" $1 "* ]]; }
sql() { ua_psql "$PORT" "bench_$1" -At -c "$2"; }

start_cluster() {  # start_cluster CONFIG
    local conf=("shared_preload_libraries = 'pg_cron,usage_agg'" "max_worker_processes = 32")
    # tuned: what the project recommends; stock: Debian's postgresql.conf as
    # initdb writes it (shared_buffers 128MB, max_wal_size 1GB, checkpoint_timeout
    # 5min), with only port, listen address, socket directory and preload set.
    [ "$1" = tuned ] && conf+=("shared_buffers = '1GB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'")
    ua_cluster_start bench "$PORT" "${conf[@]}"
    [ "${CONTENDERS[0]}" = bare ] || { echo "bench/fold.sh: the first contender must be bare" >&2; exit 2; }
    for c in "${CONTENDERS[@]}"; do
        ua_psql "$PORT" postgres -c "CREATE DATABASE bench_$c" >/dev/null
        sql "$c" "CREATE EXTENSION usage_agg" >/dev/null
    done
    # (bare is always there: the WAL positions are read in its database.)
    ua_psql "$PORT" bench_bare -f "$BENCH/bare.sql" >/dev/null
    has_contender plpgsql && ua_psql "$PORT" bench_plpgsql -f "$BENCH/plpgsql_trigger.sql" >/dev/null
    has_contender empty && ua_psql "$PORT" bench_empty -f "$BENCH/bare.sql" -f "$BENCH/empty_trigger.sql" >/dev/null
    has_contender immediate && sql immediate "UPDATE usage_agg.config SET fold_mode = 'immediate'" >/dev/null
    for c in budgets immediate_budgets; do
        has_contender "$c" || continue
        sql "$c" "UPDATE usage_agg.quota_plans SET daily_cost_limit = 1000000000, monthly_cost_budget = 1000000000" >/dev/null
    done
    has_contender immediate_budgets && sql immediate_budgets "UPDATE usage_agg.config SET fold_mode = 'immediate'" >/dev/null
    has_contender priced && sql priced "INSERT INTO usage_agg.model_prices (model, valid_from, input_per_mtok, output_per_mtok)
                                        SELECT 'model-' || m, '2026-01-01', 0.5 * m, 2 * m FROM generate_series(1, 3) m" >/dev/null
    if has_contender nokeys; then
        ua_psql "$PORT" postgres -c "ALTER DATABASE bench_nokeys SET usage_agg.per_key_aggregates = off" >/dev/null
    fi
    if has_contender nohours; then
        ua_psql "$PORT" postgres -c "ALTER DATABASE bench_nohours SET usage_agg.hourly_aggregates = off" >/dev/null
    fi
    # A database's applier connected when the database was created and read
    # its settings then: end it, so that the launcher starts one that reads the
    # settings above (before this, the nokeys applier kept per-key aggregates on).
    ua_psql "$PORT" postgres -c "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                                  WHERE backend_type = 'usage_agg applier' AND datname IN ('bench_nokeys', 'bench_nohours')" >/dev/null
    sleep 1
    # The asynchronous contenders must really run so, with their appliers.
    for c in default nokeys nohours budgets priced; do
        has_contender "$c" || continue
        for _ in $(seq 1 100); do
            [ "$(sql "$c" "SELECT effective_mode FROM usage_agg.fold_status")" = async ] && break
            sleep 0.1
        done
        [ "$(sql "$c" "SELECT effective_mode FROM usage_agg.fold_status")" = async ] \
            || { echo "the applier of bench_$c is not running" >&2; exit 1; }
    done
}
has_contender() { [[ " ${CONTENDERS[*]} " == *" $1 "* ]]; }
is_async() { [ "$1" = default ] || [ "$1" = nokeys ] || [ "$1" = nohours ] || [ "$1" = budgets ] || [ "$1" = priced ]; }
# The single-row script of a contender.
single_script() { if [ "$1" = priced ]; then echo "$BENCH/insert_priced.pgbench"; else echo "$BENCH/insert_one.pgbench"; fi; }
trap 'ua_cluster_stop bench; rm -rf "$TMP"' EXIT

reset_tables() {
    sql "$1" "TRUNCATE usage_agg.key_usage_logs, usage_agg.daily_logs, usage_agg.monthly_logs, usage_agg.pending_deltas,
                       usage_agg.key_daily_logs, usage_agg.service_daily_logs, usage_agg.pending_key_deltas,
                       usage_agg.hourly_logs, usage_agg.key_hourly_logs, usage_agg.pending_key_hour_deltas" >/dev/null
    # No VACUUM ANALYZE after the TRUNCATE: it would record the tables as empty
    # (0 rows), and plans made early in the next run would scan them
    # sequentially until autoanalyze runs, while they grow by thousands of rows.
    # A truncated table counts as never analyzed, as after CREATE EXTENSION.
    ua_psql "$PORT" "bench_$1" -c "CHECKPOINT" >/dev/null
}

# Waits until an asynchronous contender's applier has folded everything
# (the per-key deltas too); prints ms.
drain() {
    local t0; t0=$(date +%s%N)
    while [ "$(sql "${1:-default}" "SELECT (SELECT count(*) FROM usage_agg.pending_deltas) + (SELECT count(*) FROM usage_agg.pending_key_deltas)
                                           + (SELECT count(*) FROM usage_agg.pending_key_hour_deltas)")" != 0 ]; do sleep 0.05; done
    echo $(( ($(date +%s%N) - t0) / 1000000 ))
}

check_fold() {  # the aggregates equal the detail (verify_daily_logs is empty)
    # The contenders with a tier off really ran without it (their appliers too).
    if [ "$1" = nohours ] || [ "$1" = nokeys ]; then
        local table=hourly_logs
        [ "$1" = nokeys ] && table=key_daily_logs
        [ "$(sql "$1" "SELECT count(*) FROM usage_agg.$table")" = 0 ] \
            || { echo "bench_$1 wrote usage_agg.$table: its setting did not reach every fold" >&2; exit 1; }
    fi
    if [ "$1" = priced ]; then
        # Every call was priced by the table, none left unpriced.
        [ "$(sql priced "SELECT count(*) FILTER (WHERE price_valid_from IS NULL) FROM usage_agg.key_usage_logs")" = 0 ] \
            || { echo "bench_priced has calls the table did not price after $2" >&2; exit 1; }
    fi
    case "$1" in default | immediate | budgets | immediate_budgets | priced) ;; *) return 0 ;; esac
    local bad; bad=$(sql "$1" "SELECT count(*) FROM usage_agg.verify_daily_logs(current_date - 3, current_date + 1)")
    [ "$bad" = 0 ] || { echo "verify_daily_logs found $bad differences in bench_$1 after $2" >&2; exit 1; }
    bad=$(sql "$1" "SELECT count(*) FROM usage_agg.verify_key_daily_logs(current_date - 3, current_date + 1)")
    [ "$bad" = 0 ] || { echo "verify_key_daily_logs found $bad differences in bench_$1 after $2" >&2; exit 1; }
    bad=$(sql "$1" "SELECT count(*) FROM usage_agg.verify_hourly_logs(current_date - 3, current_date + 1)")
    [ "$bad" = 0 ] || { echo "verify_hourly_logs found $bad differences in bench_$1 after $2" >&2; exit 1; }
    [ "$1" = default ] || return 0
    bad=$(sql default "SELECT count(*) FROM usage_agg.fold_skipped")
    [ "$bad" = 0 ] || { echo "the applier skipped $bad days in bench_default" >&2; exit 1; }
}

# Samples the age of the oldest pending call (ms) every 100 ms into $1.
start_sampler() {  # start_sampler FILE CONTENDER
    "${UA_PG_BIN}/psql" -X -q -At -h 127.0.0.1 -p "$PORT" -U postgres -d "bench_${2:-default}" >"$1" 2>/dev/null <<'SQL' &
SELECT COALESCE(extract(epoch FROM clock_timestamp() - min(appended_at)) * 1000, 0)::int FROM usage_agg.pending_deltas \watch 0.1
SQL
    SAMPLER=$!
}
percentiles() {  # p50 p99 max of the numbers in $1
    grep -E '^[0-9]+$' "$1" | sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "- - -"; else printf "%d %d %d", a[int(NR*0.5)+1], a[int(NR*0.99)+1], a[NR]}'
}

wal_lsn() { sql bare "SELECT pg_current_wal_lsn()"; }
wal_diff() { sql bare "SELECT pg_wal_lsn_diff('$2', '$1')"; }

# run_pgbench CONFIG LABEL CONTENDER CLIENTS SCRIPT: appends
# "CONFIG LABEL CONTENDER tps p50 p99 errors wal_per_call lag_p50 lag_p99 lag_max drain_ms"
run_pgbench() {
    local cfg="$1" label="$2" c="$3" n="$4" script="$5" dir jobs=$(( $4 < 2 ? $4 : 2 ))
    dir="$(mktemp -d -p "$TMP")"
    local lsn0; lsn0=$(wal_lsn)
    is_async "$c" && start_sampler "$dir/lag" "$c"
    (cd "$dir" && "${UA_PG_BIN}/pgbench" -n -M prepared -c "$n" -j "$jobs" -T "$SECONDS_PER_RUN" -l --log-prefix=tx \
        -h 127.0.0.1 -p "$PORT" -U postgres -f "$script" "bench_$c" >out 2>&1) || true
    local lag="- - -" drained="-"
    if is_async "$c"; then
        drained=$(drain "$c")
        kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true
        lag=$(percentiles "$dir/lag")
    fi
    local lsn1; lsn1=$(wal_lsn)
    local tps calls aborted failed errors pct wal
    tps=$(awk '/^tps = / {print $3; exit}' "$dir/out")
    calls=$(awk '/number of transactions actually processed/ {print $6; exit}' "$dir/out" | cut -d/ -f1)
    aborted=$(grep -c "aborted in command" "$dir/out" || true)
    failed=$(awk '/number of failed transactions/ {print $5; exit}' "$dir/out" | tr -dc 0-9)
    errors=$(( ${aborted:-0} + ${failed:-0} ))
    pct=$(cat "$dir"/tx.* | awk '{print $3 / 1000}' | sort -g \
          | awk '{a[NR] = $1} END {printf "%.3f %.3f", a[int(NR * 0.5) + 1], a[int(NR * 0.99) + 1]}')
    wal=$(awk -v b="$(wal_diff "$lsn0" "$lsn1")" -v n="${calls:-0}" 'BEGIN { if (n > 0) printf "%.0f", b / n; else print "-" }')
    echo "$cfg $label $c ${tps:-0} $pct $errors $wal $lag $drained" >>"$RAW"
    ua_log "[$cfg] $label $c: ${tps:-0} tps, p50/p99 $pct ms, $errors errors, $wal WAL bytes/call, lag p50/p99/max $lag ms, drained in $drained ms"
    rm -rf "$dir"
}

deadlocks() { ua_psql "$PORT" postgres -At -c "SELECT sum(deadlocks) FROM pg_stat_database"; }

for cfg in $CONFIGS; do
    start_cluster "$cfg"
    before=$(deadlocks)
    for round in $(seq 1 "$ROUNDS"); do
        for n in $CLIENTS; do
            has single || break
            for c in "${CONTENDERS[@]}"; do
                reset_tables "$c"
                run_pgbench "$cfg" "single_$n" "$c" "$n" "$(single_script "$c")"
                check_fold "$c" "single-row inserts"
            done
        done
        for w in hot_user hot_key; do
            has "$w" || continue
            for c in "${CONTENDERS[@]}"; do
                reset_tables "$c"
                run_pgbench "$cfg" "${w}_16" "$c" 16 "$BENCH/insert_$w.pgbench"
                check_fold "$c" "$w"
            done
        done
    done
    echo "$cfg deadlocks all - - - $(( $(deadlocks) - before ))" >>"$RAW"

    if has bulk; then
        [ -f "$TMP/copy_1m.csv" ] || ua_psql "$PORT" bench_bare -At -f "$BENCH/copy_1m.sql" >"$TMP/copy_1m.csv"
        for round in $(seq 1 "$BULK_ROUNDS"); do
            for c in "${CONTENDERS[@]}"; do
                for load in insert copy; do
                    reset_tables "$c"
                    lsn0=$(wal_lsn)
                    t0=$(date +%s%N)
                    if [ "$load" = insert ]; then
                        ua_psql "$PORT" "bench_$c" -f "$BENCH/bulk_1m.sql" >/dev/null
                    else
                        ua_psql "$PORT" "bench_$c" -c "\\copy usage_agg.key_usage_logs (user_id, shared_key_id, api_endpoint, model_used, tokens_used, cost_estimate, success, created_at) FROM '$TMP/copy_1m.csv' WITH (FORMAT csv)" >/dev/null
                    fi
                    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
                    drained="-"
                    is_async "$c" && drained=$(drain "$c")
                    wal=$(( $(wal_diff "$lsn0" "$(wal_lsn)") / 1000000 ))
                    echo "$cfg bulk_$load $c $ms - - - $wal - - - $drained" >>"$RAW"
                    ua_log "[$cfg] round $round: 1,000,000-row $load, $c: $ms ms, $wal WAL bytes/call, drained in $drained ms"
                    check_fold "$c" "the bulk $load"
                done
                reset_tables "$c"
            done
        done
    fi

    if has intervals; then
        for interval in $INTERVALS; do
            sql default "UPDATE usage_agg.config SET apply_interval = '$interval s'" >/dev/null
            sleep 1
            reset_tables default
            run_pgbench "$cfg" "interval_$interval" default 16 "$BENCH/insert_one.pgbench"
            check_fold default "apply_interval $interval s"
        done
        sql default "UPDATE usage_agg.config SET apply_interval = DEFAULT" >/dev/null
    fi
    ua_cluster_stop bench
done
rm -f "$TMP/copy_1m.csv"

# ---------------------------------------------------------------------------
median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print ""; else print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
get() { awk -v g="$1" -v w="$2" -v c="$3" -v f="${4:-4}" '$1==g && $2==w && $3==c && $f != "-" {print $f}' "$RAW" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
fmt() { awk -v v="$1" -v d="${2:-0}" 'BEGIN { if (v == "") print "-"; else printf "%.*f", d, v }'; }
{
    echo "# usage_agg: the asynchronous fold, side by side"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), took $(( ($(date +%s) - STARTED_AT) / 60 )) min"
    echo "- machine: $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $(uname -srm)"
    echo "- server: $("${UA_PG_BIN}/postgres" --version), fsync and synchronous_commit on, usage_agg preloaded (the applier runs during every run of the default mode); pgbench on the same machine"
    echo "- configurations: tuned = shared_buffers 1GB, max_wal_size 4GB, checkpoint_timeout 30min; stock = initdb's postgresql.conf (shared_buffers 128MB, max_wal_size 1GB, checkpoint_timeout 5min)"
    echo "- command: \`BENCH_CONFIGS=\"$CONFIGS\" BENCH_WORKLOADS=\"$WORKLOADS\" BENCH_CLIENTS=\"$CLIENTS\" BENCH_SECONDS=$SECONDS_PER_RUN BENCH_ROUNDS=$ROUNDS BENCH_BULK_ROUNDS=$BULK_ROUNDS bash bench/fold.sh\`"
    echo "- pgbench -M prepared, ${SECONDS_PER_RUN} s per run, 10,000 users, 20 keys, 3 models; medians of $ROUNDS rounds (bulk: $BULK_ROUNDS)"
    for cfg in $CONFIGS; do
        echo
        echo "## $cfg configuration"
        echo
        echo "| workload | bare | default (async, applier running) | default, per-key aggregates off | immediate | PL/pgSQL trigger | empty trigger | default / bare | default / PL/pgSQL | default / per-key off |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        rows=()
        has single && for n in $CLIENTS; do rows+=("single_$n|single-row, $n clients"); done
        has hot_user && rows+=("hot_user_16|one hot user, 16 clients")
        has hot_key && rows+=("hot_key_16|one hot key, 16 clients")
        for r in "${rows[@]}"; do
            w="${r%%|*}"; name="${r#*|}"
            b=$(get "$cfg" "$w" bare); d=$(get "$cfg" "$w" default); k=$(get "$cfg" "$w" nokeys); i=$(get "$cfg" "$w" immediate); p=$(get "$cfg" "$w" plpgsql); e=$(get "$cfg" "$w" empty)
            echo "| $name: tps | $(fmt "$b") | $(fmt "$d") | $(fmt "$k") | $(fmt "$i") | $(fmt "$p") | $(fmt "$e") | $(ratio "$d" "$b") | $(ratio "$d" "$p") | $(ratio "$d" "$k") |"
            echo -n "| $name: p50 / p99 ms |"
            for c in "${MAIN_CONTENDERS[@]}"; do echo -n " $(fmt "$(get "$cfg" "$w" "$c" 5)" 2) / $(fmt "$(get "$cfg" "$w" "$c" 6)" 2) |"; done
            echo " | | |"
            echo -n "| $name: WAL bytes per call |"
            for c in "${MAIN_CONTENDERS[@]}"; do echo -n " $(fmt "$(get "$cfg" "$w" "$c" 8)") |"; done
            echo " | | |"
        done
        if has bulk; then
            for w in "bulk_insert|1,000,000-row INSERT ... SELECT" "bulk_copy|1,000,000-row COPY"; do
                k="${w%%|*}"; name="${w#*|}"
                b=$(get "$cfg" "$k" bare); d=$(get "$cfg" "$k" default); o=$(get "$cfg" "$k" nokeys); i=$(get "$cfg" "$k" immediate); p=$(get "$cfg" "$k" plpgsql); e=$(get "$cfg" "$k" empty)
                echo "| $name: ms (lower is better) | $(fmt "$b") | $(fmt "$d") | $(fmt "$o") | $(fmt "$i") | $(fmt "$p") | $(fmt "$e") | $(ratio "$d" "$b") | $(ratio "$d" "$p") | $(ratio "$d" "$o") |"
                echo -n "| $name: WAL bytes per call |"
                for c in "${MAIN_CONTENDERS[@]}"; do echo -n " $(fmt "$(get "$cfg" "$k" "$c" 8)") |"; done
                echo " | | |"
            done
        fi
        echo
        errors_of() { awk -v g="$cfg" -v c="$1" '$1 == g && $3 == c && $7 != "-" {s += $7} END {print s + 0}' "$RAW"; }
        echo "Errors (failed or aborted transactions) in all runs: bare $(errors_of bare), default $(errors_of default), per-key off $(errors_of nokeys), immediate $(errors_of immediate), PL/pgSQL $(errors_of plpgsql), empty $(errors_of empty), with cost limits $(errors_of budgets) and $(errors_of immediate_budgets) (immediate); deadlocks reported by the server: $(awk -v g="$cfg" '$1 == g && $2 == "deadlocks" {print $7}' "$RAW")."
        if has_contender nohours; then
            echo
            echo "The hourly tier (default mode, the applier running): the same build with usage_agg.hourly_aggregates = off, side by side:"
            echo
            echo "| workload | default tps | hourly tier off | default / off | WAL bytes/call | off | drained after ms | off | lag p99 ms | off |"
            echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            hourly_rows=("${rows[@]}")
            has bulk && hourly_rows+=("bulk_insert|1,000,000-row INSERT ... SELECT (ms)" "bulk_copy|1,000,000-row COPY (ms)")
            for r in "${hourly_rows[@]}"; do
                w="${r%%|*}"; name="${r#*|}"
                d=$(get "$cfg" "$w" default); h=$(get "$cfg" "$w" nohours)
                echo "| $name | $(fmt "$d") | $(fmt "$h") | $(ratio "$d" "$h") | $(fmt "$(get "$cfg" "$w" default 8)") | $(fmt "$(get "$cfg" "$w" nohours 8)") | $(fmt "$(get "$cfg" "$w" default 12)") | $(fmt "$(get "$cfg" "$w" nohours 12)") | $(fmt "$(get "$cfg" "$w" default 10)") | $(fmt "$(get "$cfg" "$w" nohours 10)") |"
            done
            echo
            echo "(For the bulk rows the first columns are milliseconds: lower is better, so there default / off above 1 is a cost.)"
        fi
        if has_contender budgets || has_contender immediate_budgets; then
            echo
            echo "Cost limits in use (a daily limit and a monthly budget on every plan, never reached): the alert checks and the per-month turn-taking, in the applier (default) and in the inserting statement (immediate):"
            echo
            echo "| workload | default tps | with limits | ratio | WAL bytes/call | with limits | drained after ms | with limits | immediate tps | with limits | ratio | WAL bytes/call | with limits |"
            echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            for r in "${rows[@]}"; do
                w="${r%%|*}"; name="${r#*|}"
                d=$(get "$cfg" "$w" default); db=$(get "$cfg" "$w" budgets); i=$(get "$cfg" "$w" immediate); ib=$(get "$cfg" "$w" immediate_budgets)
                echo "| $name | $(fmt "$d") | $(fmt "$db") | $(ratio "$db" "$d") | $(fmt "$(get "$cfg" "$w" default 8)") | $(fmt "$(get "$cfg" "$w" budgets 8)") | $(fmt "$(get "$cfg" "$w" default 12)") | $(fmt "$(get "$cfg" "$w" budgets 12)") | $(fmt "$i") | $(fmt "$ib") | $(ratio "$ib" "$i") | $(fmt "$(get "$cfg" "$w" immediate 8)") | $(fmt "$(get "$cfg" "$w" immediate_budgets 8)") |"
            done
        fi
        if has_contender priced; then
            echo
            echo "Token kinds and table prices: priced reports input and output tokens and no cost, and the pricing trigger prices it from model_prices; default gives tokens_used and a cost (single-row runs only). The ratio is the median of the ratios within each round (the machine drifts between rounds):"
            echo
            echo "| workload | default tps | priced tps | priced / default | WAL bytes/call | priced | drained after ms | priced |"
            echo "|---|---:|---:|---:|---:|---:|---:|---:|"
            for r in "${rows[@]}"; do
                w="${r%%|*}"; name="${r#*|}"
                case "$w" in single_*) ;; *) continue ;; esac
                per_round=$(awk -v g="$cfg" -v w="$w" '$1==g && $2==w && $3=="default" {d[++nd]=$4} $1==g && $2==w && $3=="priced" {p[++np]=$4}
                                END {for (i = 1; i <= nd && i <= np; i++) if (d[i] > 0) print p[i] / d[i]}' "$RAW" | median)
                echo "| $name | $(fmt "$(get "$cfg" "$w" default)") | $(fmt "$(get "$cfg" "$w" priced)") | $(awk -v r="$per_round" 'BEGIN { if (r == "") print "-"; else printf "%.2fx", r }') | $(fmt "$(get "$cfg" "$w" default 8)") | $(fmt "$(get "$cfg" "$w" priced 8)") | $(fmt "$(get "$cfg" "$w" default 12)") | $(fmt "$(get "$cfg" "$w" priced 12)") |"
            done
        fi
        echo
        echo "Freshness of the default mode (age of the oldest pending call, sampled every 100 ms during the run; time to fold the backlog after the load stopped):"
        echo
        echo "| workload | lag p50 ms | lag p99 ms | lag max ms | drained after ms | per-key off: lag p99 ms | per-key off: drained after ms |"
        echo "|---|---:|---:|---:|---:|---:|---:|"
        for r in "${rows[@]}"; do
            w="${r%%|*}"; name="${r#*|}"
            echo "| $name | $(fmt "$(get "$cfg" "$w" default 9)") | $(fmt "$(get "$cfg" "$w" default 10)") | $(fmt "$(get "$cfg" "$w" default 11)") | $(fmt "$(get "$cfg" "$w" default 12)") | $(fmt "$(get "$cfg" "$w" nokeys 10)") | $(fmt "$(get "$cfg" "$w" nokeys 12)") |"
        done
        has bulk && for k in bulk_insert bulk_copy; do
            echo "| $k | | | | $(fmt "$(get "$cfg" "$k" default 12)") |"
        done
        if has intervals; then
            echo
            echo "apply_interval against 16-client single-row throughput and lag (one run each):"
            echo
            echo "| apply_interval | tps | lag p50 ms | lag p99 ms | lag max ms | WAL bytes per call |"
            echo "|---|---:|---:|---:|---:|---:|"
            for interval in $INTERVALS; do
                w="interval_$interval"
                echo "| $interval s | $(fmt "$(get "$cfg" "$w" default)") | $(fmt "$(get "$cfg" "$w" default 9)") | $(fmt "$(get "$cfg" "$w" default 10)") | $(fmt "$(get "$cfg" "$w" default 11)") | $(fmt "$(get "$cfg" "$w" default 8)") |"
            done
        fi
    done
    echo
    echo "<details><summary>raw results (config workload contender tps p50 p99 errors wal/call lag_p50 lag_p99 lag_max drain_ms)</summary>"
    echo
    echo '```'
    cat "$RAW"
    echo '```'
    echo "</details>"
} | tee "$OUT"
ua_log "written to $OUT"
