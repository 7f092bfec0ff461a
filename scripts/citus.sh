#!/usr/bin/env bash
# Citus on this machine, for the scale-out work (issue 20): builds Citus 13.2.2
# from ../shared/vendor/ into the PostgreSQL 15 of scripts/lib.sh (once: skipped
# when that citus.so is installed already), and starts or stops a coordinator
# and two workers on three local ports with citus and usage_agg preloaded.
#
#   bash scripts/citus.sh build
#   bash scripts/citus.sh start [PORT]   coordinator on PORT (29950), workers on PORT+1, PORT+2
#   bash scripts/citus.sh stop
#
# scripts/test-version.sh starts it for tests/citus.rs (PostgreSQL 15); what
# works on Citus so far: docs/citus.md. The clusters live in
# $UA_RUN_DIR/citus-n{0,1,2}.
set -euo pipefail
PG_VERSION=15
source "$(dirname "$0")/lib.sh"

CITUS_VERSION=13.2.2
CITUS_SOURCE="${UA_ROOT}/../shared/vendor/citus-${CITUS_VERSION}.tar.gz"

citus_build() {
    local pkglib
    pkglib="$("${UA_PG_BIN}/pg_config" --pkglibdir)"
    if [ -f "${pkglib}/citus.so" ] && grep -q "default_version = '13.2-1'" \
        "$("${UA_PG_BIN}/pg_config" --sharedir)/extension/citus.control" 2>/dev/null; then
        ua_log "Citus ${CITUS_VERSION} is installed in ${pkglib} already"
        return
    fi
    [ -f "$CITUS_SOURCE" ] || { echo "no Citus source at $CITUS_SOURCE and no Citus installed" >&2; exit 1; }
    if [ "$(id -u)" -eq 0 ]; then
        apt-get install -y -q libkrb5-dev liblz4-dev libzstd-dev libssl-dev >/dev/null
    fi
    local build="${UA_RUN_DIR}/citus-build"
    rm -rf "$build"
    mkdir -p "$build"
    tar xzf "$CITUS_SOURCE" -C "$build"
    ua_log "building Citus ${CITUS_VERSION} (about 3 minutes on 2 cores)"
    (
        cd "$build/citus-${CITUS_VERSION}"
        ./configure --without-libcurl PG_CONFIG="${UA_PG_BIN}/pg_config" >"$build/configure.log"
        make -j2 with_llvm=no >"$build/make.log"
        ua_sudo make install with_llvm=no >"$build/install.log"
    )
}

citus_start() {
    local port="${1:-29950}" n
    for n in 0 1 2; do
        # Local servers have no SSL; Citus asks for it by default.
        ua_cluster_start "citus-n$n" "$((port + n))" \
            "shared_preload_libraries = 'citus,usage_agg'" "max_worker_processes = 32" \
            "citus.node_conninfo = 'sslmode=disable'"
        ua_psql "$((port + n))" usage_agg_test -c "CREATE EXTENSION citus" >/dev/null
    done
    ua_psql "$port" usage_agg_test \
        -c "SELECT citus_set_coordinator_host('127.0.0.1', $port)" \
        -c "SELECT citus_add_node('127.0.0.1', $((port + 1)))" \
        -c "SELECT citus_add_node('127.0.0.1', $((port + 2)))" >/dev/null
    ua_log "Citus: coordinator on port $port, workers on $((port + 1)) and $((port + 2)) (database usage_agg_test)"
}

citus_stop() {
    local n
    for n in 0 1 2; do ua_cluster_stop "citus-n$n" || true; done
}

case "${1:-}" in
    build) citus_build ;;
    start) citus_build; citus_start "${2:-29950}" ;;
    stop) citus_stop ;;
    *) echo "usage: $0 build | start [PORT] | stop" >&2; exit 2 ;;
esac
