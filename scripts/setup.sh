#!/usr/bin/env bash
# Installs what building and testing usage_agg needs (idempotent).
source "$(dirname "$0")/lib.sh"
ua_setup
