#!/usr/bin/env bash
# Used by tests/crash.rs: kill -9 every process of a test cluster (a crash, not a
# shutdown), or start it again (WAL recovery). Usage: crash_restart.sh kill|start NAME
source "$(dirname "$0")/lib.sh"
dir="${UA_RUN_DIR}/$2"
case "$1" in
    kill)
        pid=$(head -1 "$dir/data/postmaster.pid")
        children=$(pgrep -P "$pid" || true)
        kill -9 "$pid" $children
        # Wait until every process of the cluster is gone.
        for _ in $(seq 1 100); do
            kill -0 "$pid" $children 2>/dev/null || break
            sleep 0.1
        done
        ;;
    start)
        ua_pg_ctl_start "$dir"
        ;;
    *) echo "usage: $0 kill|start NAME" >&2; exit 2 ;;
esac
