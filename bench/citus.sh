#!/usr/bin/env bash
# Inserts on a local Citus cluster (scripts/citus.sh: a coordinator and two
# workers on this one machine), pgbench against the coordinator. Three servers
# on the same cores: this shows what each contender costs per call on Citus,
# not how Citus scales.
#
# Contenders (one database, three tables with the same columns and indexes,
# all distributed by user_id and colocated):
#   bare     bench.bare_calls: no aggregation (the physical limit)
#   default  usage_agg.key_usage_logs after usage_agg.distribute(): the
#            asynchronous fold, each worker's applier running during the run
#   plpgsql  bench.plpgsql_calls with the hand-written row trigger of
#            bench/plpgsql_trigger.sql as Citus lets a team write it
#            (bench/plpgsql_trigger_citus.sql: read the row locked, compute,
#            write), into bench.daily_logs, colocated, so that its statements
#            run on the shard's node
#
# Per run: tps, WAL bytes per call summed over the three nodes (for default
# from before the run until every worker's applier has drained, so the
# applier's WAL counts) and the drain time.
#
#   bash bench/citus.sh
#   BENCH_ROUNDS=1 BENCH_CLIENTS=16 bash bench/citus.sh
set -euo pipefail
PG_VERSION=15
source "$(dirname "$0")/../scripts/lib.sh"
ua_setup
ua_install_extension

BENCH="$UA_ROOT/bench"
PORT="${USAGE_AGG_BENCH_CITUS_PORT:-28830}"
CLIENTS="${BENCH_CLIENTS:-1 16}"
SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
ROUNDS="${BENCH_ROUNDS:-3}"
OUT="${BENCH_OUT:-$BENCH/results/citus-latest.md}"
CONTENDERS=(bare default plpgsql)
NODES=("$PORT" "$((PORT + 1))" "$((PORT + 2))")
TMP="$(mktemp -d)"
chmod 755 "$TMP"

bash "$UA_ROOT/scripts/citus.sh" start "$PORT"
trap 'bash "$UA_ROOT/scripts/citus.sh" stop' EXIT
sql() { ua_psql "$1" usage_agg_test -At -c "$2"; }

# The tables, and the hand-written trigger (bench/plpgsql_trigger_citus.sql).
ua_psql "$PORT" usage_agg_test -q <<SQL >/dev/null
CREATE EXTENSION usage_agg;
SELECT count(*) FROM usage_agg.distribute();
CREATE SCHEMA bench;
SET citus.enable_unsafe_triggers = on;
CREATE TABLE bench.bare_calls (LIKE usage_agg.key_usage_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
CREATE TABLE bench.plpgsql_calls (LIKE usage_agg.key_usage_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
CREATE TABLE bench.daily_logs (LIKE usage_agg.daily_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)
    WITH (fillfactor = 70);
\i $BENCH/plpgsql_trigger_citus.sql
CREATE TRIGGER plpgsql_fold AFTER INSERT ON bench.plpgsql_calls
    FOR EACH ROW EXECUTE FUNCTION public.plpgsql_fold();
SELECT create_distributed_table('bench.bare_calls', 'user_id', colocate_with => 'usage_agg.key_usage_logs');
SELECT create_distributed_table('bench.plpgsql_calls', 'user_id', colocate_with => 'usage_agg.key_usage_logs');
SELECT create_distributed_table('bench.daily_logs', 'user_id', colocate_with => 'usage_agg.key_usage_logs');
SQL
for n in "${NODES[@]:1}"; do
    for _ in $(seq 1 200); do
        [ "$(sql "$n" "SELECT applier_running FROM usage_agg.fold_status")" = t ] && break
        sleep 0.1
    done
done
sed 's/usage_agg\.key_usage_logs/bench.bare_calls/' "$BENCH/insert_one.pgbench" >"$TMP/bare.pgbench"
sed 's/usage_agg\.key_usage_logs/bench.plpgsql_calls/' "$BENCH/insert_one.pgbench" >"$TMP/plpgsql.pgbench"
cp "$BENCH/insert_one.pgbench" "$TMP/default.pgbench"
chmod 644 "$TMP"/*.pgbench

# sum_over_nodes SQL: the integer SQL returns, summed over the three nodes.
sum_over_nodes() {
    local total=0 n
    for n in "${NODES[@]}"; do total=$((total + $(sql "$n" "$1"))); done
    echo "$total"
}
wal_sum() { sum_over_nodes "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"; }
pending_sum() { sum_over_nodes "SELECT pending_calls FROM usage_agg.fold_status"; }

RAW="$TMP/raw"
: >"$RAW"
for round in $(seq 1 "$ROUNDS"); do
    for clients in $CLIENTS; do
        for c in "${CONTENDERS[@]}"; do
            for n in "${NODES[@]}"; do sql "$n" "CHECKPOINT" >/dev/null; done
            before=$(wal_sum)
            out=$("${UA_PG_BIN}/pgbench" -n -M prepared -h 127.0.0.1 -p "$PORT" -U postgres \
                -c "$clients" -j "$(( clients < 2 ? 1 : 2 ))" -T "$SECONDS_PER_RUN" \
                -f "$TMP/$c.pgbench" usage_agg_test 2>&1)
            tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
            [ -n "$tps" ] || { echo "pgbench failed for $c: $out" >&2; exit 1; }
            calls=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
            drain=0
            if [ "$c" = default ]; then
                start=$(date +%s.%N)
                while [ "$(pending_sum)" -gt 0 ]; do sleep 0.05; done
                drain=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')
            fi
            wal=$(( ($(wal_sum) - before) / calls ))
            echo "$round $clients $c $tps $wal $drain" | tee -a "$RAW"
        done
    done
done

# Exactness after all rounds: usage_agg's aggregates against the detail.
mismatches=$(sql "$PORT" "
    WITH g AS (SELECT user_id, (created_at AT TIME ZONE 'UTC')::date AS d, count(*) AS n, sum(cost_estimate) AS c
                 FROM usage_agg.key_usage_logs GROUP BY 1, 2),
         a AS (SELECT user_id, date AS d, (log_data->>'api_call_count')::bigint AS n,
                      (log_data->'shared_service_usage'->>'estimated_cost')::numeric AS c
                 FROM usage_agg.daily_logs)
    SELECT count(*) FROM g FULL JOIN a USING (user_id, d)
     WHERE a.n IS DISTINCT FROM g.n OR a.c IS DISTINCT FROM g.c")

{
    echo "# Inserts on a local Citus cluster"
    echo
    echo "\`bash bench/citus.sh\` (BENCH_ROUNDS=$ROUNDS, BENCH_CLIENTS=\"$CLIENTS\", ${SECONDS_PER_RUN} s per run),"
    echo "$(date -u +%Y-%m-%d), commit $(cd "$UA_ROOT" && git rev-parse --short HEAD), PostgreSQL ${UA_PG_MAJOR}, Citus 13.2.2,"
    echo "a coordinator and two workers on one $(nproc)-core machine, pgbench against the coordinator"
    echo "(\`insert_one.pgbench\`: single-row inserts, 10,000 users). Three servers on the same cores:"
    echo "cost per call on Citus, not scale."
    echo
    echo "| round | clients | contender | tps | WAL bytes/call (3 nodes) | drain s |"
    echo "|---|---|---|---|---|---|"
    while read -r round clients c tps wal drain; do
        echo "| $round | $clients | $c | $tps | $wal | $drain |"
    done <"$RAW"
    echo
    echo "Within-round ratios (tps of the contender / tps of bare):"
    echo
    echo "| clients | default / bare | plpgsql / bare | default / plpgsql |"
    echo "|---|---|---|---|"
    for clients in $CLIENTS; do
        awk -v cl="$clients" '$2 == cl { t[$1 " " $3] = $4; r[$1] = 1 }
            END { for (k in r) { printf "%s %.2f %.2f %.2f\n", k, t[k " default"] / t[k " bare"],
                                        t[k " plpgsql"] / t[k " bare"], t[k " default"] / t[k " plpgsql"] } }' "$RAW" \
            | sort -n | awk -v cl="$clients" '{ a = a sep $2; b = b sep $3; c = c sep $4; sep = ", " }
                END { print "| " cl " | " a " | " b " | " c " |" }'
    done
    echo
    echo "usage_agg's daily rows against a GROUP BY over its detail after all rounds: $mismatches (user, day)s differ."
} >"$OUT"
cat "$OUT"
