# Shared helpers for setup.sh, demo.sh, test.sh and bench/run.sh. Source it.
# Works as root (server processes run as the `postgres` user) and as a normal
# user (apt and installs go through sudo).
set -euo pipefail

UA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UA_PG_MAJOR=15
UA_PGRX_VERSION=0.18.0
UA_PG_BIN="/usr/lib/postgresql/${UA_PG_MAJOR}/bin"
UA_PG_CONFIG="${UA_PG_BIN}/pg_config"
UA_RUN_DIR="${USAGE_AGG_RUN_DIR:-/tmp/usage_agg-$(id -un)}"
UA_APT_PACKAGES=(postgresql-${UA_PG_MAJOR} postgresql-server-dev-${UA_PG_MAJOR}
                 postgresql-${UA_PG_MAJOR}-cron postgresql-contrib libclang-dev clang
                 pgbouncer sudo pkg-config build-essential procps)

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

ua_install_cargo_pgrx() {
    if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "${UA_PGRX_VERSION}" ]; then
        ua_log "installing cargo-pgrx ${UA_PGRX_VERSION} (takes a few minutes)"
        cargo install cargo-pgrx --version "${UA_PGRX_VERSION}" --locked --force
    fi
    local cfg="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
    if ! grep -q "^pg${UA_PG_MAJOR} = \"${UA_PG_CONFIG}\"" "$cfg" 2>/dev/null; then
        ua_log "cargo pgrx init --pg${UA_PG_MAJOR} ${UA_PG_CONFIG}"
        cargo pgrx init --pg${UA_PG_MAJOR} "${UA_PG_CONFIG}"
    fi
}

ua_setup() {
    ua_install_packages
    ua_install_cargo_pgrx
}

# Builds and installs the extension into the system PostgreSQL ($libdir, sharedir).
ua_install_extension() {
    ua_log "building and installing usage_agg (release)"
    local sudo_flag=()
    [ "$(id -u)" -eq 0 ] || sudo_flag=(--sudo)
    (cd "$UA_ROOT" && cargo pgrx install --release --pg-config "${UA_PG_CONFIG}" "${sudo_flag[@]}")
}

# Released versions and the commits their tags point to, for the upgrade test.
# The commit is the fallback when a clone came without tags.
declare -A UA_RELEASE_COMMITS=([v0.1.0]=6387a568072334c02ecc4ca234e2d84e6a092dbb
                               [v0.2.0]=a947c87ce0184753bb680ba10501962a82ba16c8)

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
    ua_log "building and installing usage_agg $tag (release) for the upgrade test"
    rm -rf "$dir"
    mkdir -p "$dir"
    git -C "$UA_ROOT" archive "$rev" | tar -x -C "$dir"
    local sudo_flag=()
    [ "$(id -u)" -eq 0 ] || sudo_flag=(--sudo)
    (cd "$dir" && CARGO_TARGET_DIR="$UA_ROOT/target/release-$tag" \
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
    # The server's environment is ours less RUST_BACKTRACE/RUST_LIB_BACKTRACE,
    # plus $UA_SERVER_ENV (VAR=value ...; the applier cluster sets them, to show
    # that errors carry no backtraces whatever the environment).
    ua_as_pg env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE ${UA_SERVER_ENV:-} \
        "${UA_PG_BIN}/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
    ua_psql "$port" postgres -c "CREATE DATABASE usage_agg_test" >/dev/null
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
