#!/usr/bin/env bash
# Type-checks usage_agg for the PostgreSQL versions it builds for but is not
# run on here (13, 14, 17: no server of theirs on this machine), against the
# bindings pgrx ships for each (see scripts/rustc-bindings-only.sh).
source "$(dirname "$0")/lib.sh"
cd "$UA_ROOT"
for v in 13 14 17; do
    ua_log "type-checking the build for PostgreSQL $v"
    DOCS_RS=1 RUSTC_WRAPPER="$UA_ROOT/scripts/rustc-bindings-only.sh" CARGO_TARGET_DIR="$UA_ROOT/target/check" \
        cargo check --quiet --lib --no-default-features --features "pg$v"
done
