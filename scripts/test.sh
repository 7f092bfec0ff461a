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
# its own library; tests/upgrade.rs then updates it with the current one.
ua_install_tag v0.1.0
ua_psql "$PORT" postgres -c "CREATE DATABASE usage_agg_upgrade" >/dev/null
ua_psql "$PORT" usage_agg_upgrade -f "$UA_ROOT/tests/upgrade/write_v0.1.0_data.sql" >/dev/null
export USAGE_AGG_UPGRADE_PORT="$PORT"

ua_install_extension
# A second cluster for tests/crash.rs, which kills its server with SIGKILL.
CRASH_PORT=$((PORT + 2))
ua_cluster_start crash "$CRASH_PORT"
trap 'ua_cluster_stop itest; ua_cluster_stop crash' EXIT
export USAGE_AGG_CRASH_PORT="$CRASH_PORT"
ua_log "integration tests against a live cluster on port ${PORT}"
export USAGE_AGG_TEST_DSN="host=127.0.0.1 port=${PORT} user=postgres dbname=usage_agg_test"
export USAGE_AGG_TEST_PORT="$PORT"
cargo test --test '*' -- --test-threads="${USAGE_AGG_TEST_THREADS:-2}"
