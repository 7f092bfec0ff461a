#!/usr/bin/env bash
# Runs the whole test suite: Rust unit tests and #[pg_test]s (cargo pgrx test), then
# the integration tests in tests/ against a live cluster with the extension
# installed and pg_cron preloaded.
source "$(dirname "$0")/lib.sh"
ua_setup
cd "$UA_ROOT"

ua_log "unit tests and #[pg_test]s"
mkdir -p "${UA_RUN_DIR}"
chmod 755 "${UA_RUN_DIR}"
if [ "$(id -u)" -eq 0 ]; then
    mkdir -p "${UA_RUN_DIR}/pgrx-test"
    chown postgres: "${UA_RUN_DIR}/pgrx-test"
    rm -rf "${UA_RUN_DIR}/pgrx-test/data"
    cargo pgrx test pg${UA_PG_MAJOR} --runas postgres --pgdata "${UA_RUN_DIR}/pgrx-test/data"
else
    cargo pgrx test pg${UA_PG_MAJOR}
fi

PORT="${USAGE_AGG_TEST_PORT:-28816}"
ua_cluster_start itest "$PORT"
trap 'ua_cluster_stop itest' EXIT

# Upgrade test: every released version, installed from its tag, writes data with
# its own library into a database of its own; tests/upgrade.rs then updates each
# with the current one.
for release in v0.1.0 v0.2.0; do
    ua_install_tag "$release"
    db="usage_agg_upgrade_${release//./_}"
    ua_psql "$PORT" postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
    ua_psql "$PORT" "$db" -f "$UA_ROOT/tests/upgrade/write_${release}_data.sql" >/dev/null
done
export USAGE_AGG_UPGRADE_PORT="$PORT"

ua_install_extension
# A second cluster with the background applier (usage_agg preloaded next to
# pg_cron), for tests/applier.rs and tests/crash.rs (which kills it with SIGKILL).
# Started with RUST_BACKTRACE set, as a developer's shell might: errors must not
# carry backtraces anyway (tests/applier.rs).
APPLIER_PORT=$((PORT + 2))
export UA_SERVER_ENV="RUST_BACKTRACE=1 RUST_LIB_BACKTRACE=1"
ua_cluster_start applier "$APPLIER_PORT" "shared_preload_libraries = 'pg_cron,usage_agg'" \
    "max_worker_processes = 32"
trap 'ua_cluster_stop itest; ua_cluster_stop applier' EXIT
export USAGE_AGG_APPLIER_PORT="$APPLIER_PORT" USAGE_AGG_APPLIER_CLUSTER=applier \
    USAGE_AGG_APPLIER_LOG="${UA_RUN_DIR}/applier/server.log"
# pgbouncer in transaction pooling mode in front of each cluster (tests/pooler.rs).
PGBOUNCER_PORT=$((PORT + 6))
bash "$UA_ROOT/scripts/pgbouncer.sh" start itest "$PORT" "$PGBOUNCER_PORT"
bash "$UA_ROOT/scripts/pgbouncer.sh" start applier "$APPLIER_PORT" "$((PGBOUNCER_PORT + 1))"
trap 'bash "$UA_ROOT/scripts/pgbouncer.sh" stop itest; bash "$UA_ROOT/scripts/pgbouncer.sh" stop applier
      ua_cluster_stop itest; ua_cluster_stop applier' EXIT
export USAGE_AGG_PGBOUNCER_PORT="$PGBOUNCER_PORT" USAGE_AGG_APPLIER_PGBOUNCER_PORT="$((PGBOUNCER_PORT + 1))"
ua_log "integration tests against a live cluster on port ${PORT}"
export USAGE_AGG_TEST_PORT="$PORT"
cargo test --test '*' -- --test-threads="${USAGE_AGG_TEST_THREADS:-2}"
