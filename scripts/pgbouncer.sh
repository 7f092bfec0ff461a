#!/usr/bin/env bash
# pgbouncer in transaction pooling mode in front of a test cluster, for
# tests/pooler.rs (started and stopped by scripts/test.sh). Usage:
#   pgbouncer.sh start NAME SERVER_PORT LISTEN_PORT   (files in $UA_RUN_DIR/pgbouncer-NAME)
#   pgbouncer.sh stop NAME
# Every database of the cluster is reachable under its own name; at most
# POOL_SIZE server connections per database are shared by all clients.
source "$(dirname "$0")/lib.sh"
POOL_SIZE="${USAGE_AGG_PGBOUNCER_POOL_SIZE:-6}"

ua_pgbouncer_stop() {
    local dir="${UA_RUN_DIR}/pgbouncer-$1"
    if [ -f "$dir/pgbouncer.pid" ]; then
        local pid
        pid="$(cat "$dir/pgbouncer.pid")"
        kill -INT "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$dir/pgbouncer.pid"
    fi
}

case "${1:-}" in
    start)
        name="$2" server_port="$3" listen_port="$4"
        dir="${UA_RUN_DIR}/pgbouncer-${name}"
        ua_pgbouncer_stop "$name"
        command -v pgbouncer >/dev/null || PATH="$PATH:/usr/sbin"
        rm -rf "$dir"
        mkdir -p "$dir"
        echo '"postgres" ""' >"$dir/userlist.txt"
        cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=${server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = ${listen_port}
unix_socket_dir =
pool_mode = transaction
default_pool_size = ${POOL_SIZE}
max_client_conn = 400
auth_type = trust
auth_file = ${dir}/userlist.txt
logfile = ${dir}/pgbouncer.log
pidfile = ${dir}/pgbouncer.pid
server_check_delay = 0
INI
        if [ "$(id -u)" -eq 0 ]; then chown -R postgres: "$dir"; fi
        ua_as_pg pgbouncer -d "$dir/pgbouncer.ini"
        for _ in $(seq 50); do [ -f "$dir/pgbouncer.pid" ] && break; sleep 0.1; done
        [ -f "$dir/pgbouncer.pid" ] || { cat "$dir/pgbouncer.log" >&2; exit 1; }
        ;;
    stop) ua_pgbouncer_stop "$2" ;;
    *) echo "usage: $0 start NAME SERVER_PORT LISTEN_PORT | stop NAME" >&2; exit 2 ;;
esac
