#!/usr/bin/env bash
# Used by tests/standby.rs: a streaming-replication hot standby of a test
# cluster, made with pg_basebackup -R. Usage:
#   standby.sh start PRIMARY_PORT STANDBY_PORT   (cluster in $UA_RUN_DIR/standby)
#   standby.sh stop
source "$(dirname "$0")/lib.sh"
dir="${UA_RUN_DIR}/standby"
case "$1" in
    start)
        ua_cluster_stop standby || true
        rm -rf "$dir"
        mkdir -p "$dir"
        if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir"; fi
        ua_as_pg "${UA_PG_BIN}/pg_basebackup" -h 127.0.0.1 -p "$2" -U postgres -D "$dir/data" -R -X stream --checkpoint=fast >/dev/null
        {
            echo "port = $3"
            echo "unix_socket_directories = '$dir'"
            echo "hot_standby = on"
        } | ua_as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
        ua_pg_ctl_start "$dir"
        ;;
    stop) ua_cluster_stop standby || true ;;
    *) echo "usage: $0 start PRIMARY_PORT STANDBY_PORT | stop" >&2; exit 2 ;;
esac
