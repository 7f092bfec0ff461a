#!/usr/bin/env bash
# Runs the whole test suite: type-checks the builds for PostgreSQL 13, 14 and
# 17 (scripts/check-versions.sh), then runs every test on each version tested,
# 15, 16 and 18 (scripts/test-version.sh). PG_VERSION=16 runs one version only.
source "$(dirname "$0")/lib.sh"
if [ -n "${PG_VERSION:-}" ]; then
    versions=("$PG_VERSION")
else
    versions=("${UA_PG_VERSIONS_TESTED[@]}")
    bash "$UA_ROOT/scripts/check-versions.sh"
fi
for v in "${versions[@]}"; do
    ua_log "PostgreSQL $v: the whole suite"
    PG_VERSION="$v" bash "$UA_ROOT/scripts/test-version.sh"
done
ua_log "all tests passed on PostgreSQL ${versions[*]}"
