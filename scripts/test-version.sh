#!/usr/bin/env bash
# The whole test suite on one PostgreSQL version (PG_VERSION, default 15):
# Rust unit tests and #[pg_test]s (cargo pgrx test), then the integration tests
# in tests/ against live clusters with the extension installed and pg_cron
# preloaded. scripts/test.sh runs it for every version tested.
source "$(dirname "$0")/lib.sh"
ua_setup
cd "$UA_ROOT"
ua_log "PostgreSQL ${UA_PG_MAJOR}: unit tests and #[pg_test]s"
mkdir -p "${UA_RUN_DIR}"
chmod 755 "${UA_RUN_DIR}"
pgrx_data="${UA_RUN_DIR}/pgrx-test${UA_PG_SUFFIX}"
if [ ! -f "$("$UA_PG_CONFIG" --sharedir)/extension/amcheck.control" ]; then
    ua_log "skipped: amcheck's index check in tests::pg_deferred_append_matches_the_sql_append (contrib's amcheck is not installed in PostgreSQL ${UA_PG_MAJOR} here)"
fi
if [ -n "${USAGE_AGG_SKIP_PG_TESTS:-}" ]; then
    # For a developer's second run: CI never sets it.
    ua_log "skipped: unit tests and #[pg_test]s (USAGE_AGG_SKIP_PG_TESTS is set)"
elif [ "$(id -u)" -eq 0 ]; then
    mkdir -p "$pgrx_data"
    chown postgres: "$pgrx_data"
    rm -rf "$pgrx_data/data"
    CARGO_TARGET_DIR="$UA_TARGET_DIR" cargo pgrx test pg${UA_PG_MAJOR} --runas postgres --pgdata "$pgrx_data/data"
else
    CARGO_TARGET_DIR="$UA_TARGET_DIR" cargo pgrx test pg${UA_PG_MAJOR}
fi

PORT="${USAGE_AGG_TEST_PORT:-28816}"
# cron.log_min_messages: pg_cron logs every job it starts (tests/cron.rs shows
# those lines when a job did not run).
ua_cluster_start itest "$PORT" "cron.log_min_messages = log"
trap 'ua_cluster_stop itest' EXIT

# Upgrade test: every released version, installed from its tag, writes data with
# its own library into a database of its own; tests/upgrade.rs then updates each
# with the current one.
# Only releases built for this PostgreSQL version (UA_RELEASE_PG_VERSIONS).
upgrade_releases=()
for release in "${UA_RELEASES[@]}"; do
    if [ "$release" = "v${UA_VERSION}" ]; then
        ua_log "skipped: the upgrade test from $release (this build is $UA_VERSION: nothing to update to yet)"
        continue
    fi
    case " ${UA_RELEASE_PG_VERSIONS[$release]} " in
        *" ${UA_PG_MAJOR} "*) upgrade_releases+=("$release") ;;
        *) continue ;;
    esac
    ua_install_tag "$release"
    db="usage_agg_upgrade_${release//./_}"
    ua_psql "$PORT" postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
    ua_psql "$PORT" "$db" -f "$UA_ROOT/tests/upgrade/write_${release}_data.sql" >/dev/null
done
export USAGE_AGG_UPGRADE_PORT="$PORT" USAGE_AGG_UPGRADE_RELEASES="${upgrade_releases[*]}"
if [ "${#upgrade_releases[@]}" -eq 0 ]; then
    ua_log "skipped: tests/upgrade.rs has no earlier release to update from on PostgreSQL ${UA_PG_MAJOR} (0.1.0 and 0.2.0 were built for PostgreSQL 15 only; 0.3.0 is this build)"
fi

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
# A Citus coordinator and two workers (tests/citus.rs), where Citus 13.2.2 is
# built for this version: from ../shared/vendor, once per machine.
CITUS_PORT=$((PORT + 8))
if [ "$UA_PG_MAJOR" != 15 ]; then
    export USAGE_AGG_CITUS_SKIPPED="Citus 13.2.2 is built here for PostgreSQL 15 only (scripts/citus.sh); this run is PostgreSQL ${UA_PG_MAJOR}"
elif ! bash "$UA_ROOT/scripts/citus.sh" build; then
    export USAGE_AGG_CITUS_SKIPPED="Citus could not be built or found for PostgreSQL 15 (scripts/citus.sh build failed: see its output above)"
else
    bash "$UA_ROOT/scripts/citus.sh" start "$CITUS_PORT"
    export USAGE_AGG_CITUS_PORT="$CITUS_PORT"
    trap 'bash "$UA_ROOT/scripts/citus.sh" stop; bash "$UA_ROOT/scripts/pgbouncer.sh" stop itest
          bash "$UA_ROOT/scripts/pgbouncer.sh" stop applier; ua_cluster_stop itest; ua_cluster_stop applier' EXIT
fi
if [ -n "${USAGE_AGG_CITUS_SKIPPED:-}" ]; then
    ua_log "skipped: tests/citus.rs on a Citus cluster (${USAGE_AGG_CITUS_SKIPPED})"
fi
ua_log "PostgreSQL ${UA_PG_MAJOR}: integration tests against live clusters on ports ${PORT} and ${APPLIER_PORT}"
# The tests are clients: one build of them (for 15) serves every server version.
export USAGE_AGG_TEST_PORT="$PORT" USAGE_AGG_PG_BIN="$UA_PG_BIN" USAGE_AGG_PG_MAJOR="$UA_PG_MAJOR" \
    USAGE_AGG_TEST_LOG="${UA_RUN_DIR}/itest/server.log"
# Every test binary runs, so that one failure does not hide the others;
# USAGE_AGG_TESTS="keys upgrade" picks binaries (a developer's rerun).
targets=()
for t in ${USAGE_AGG_TESTS:-}; do targets+=(--test "$t"); done
[ "${#targets[@]}" -gt 0 ] || targets=(--test '*')
cargo test --no-fail-fast "${targets[@]}" -- --test-threads="${USAGE_AGG_TEST_THREADS:-2}"
