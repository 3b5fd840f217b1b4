#!/usr/bin/env bash
# Local development: private NATS (JetStream) and Redis, plus the function
# binaries, until Ctrl-C.
#
#   scripts/dev.sh            # or: ./just dev
#
# NATS_URL / REDIS_URL, if set, point at servers you run yourself; otherwise
# private ones are started on free ports, with their state in .jetfn/:
#   .jetfn/nats/  JetStream store (kept between runs; delete it to start over)
#   .jetfn/nats.log, .jetfn/redis.log  server logs
#   .jetfn/nats.url  the NATS URL, for scripts/send.py (removed on exit)
# On Ctrl-C (or when a function exits) the functions get SIGTERM first, then
# the private servers are stopped. External servers are left alone.
set -euo pipefail

# The function binaries to build and run (space-separated package/binary
# names under functions/). Add new functions here.
FUNCTIONS="account account-projection"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=scripts/tools.sh
source "$root/scripts/tools.sh"

state="$root/.jetfn"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
rel_state=".jetfn"
export RUST_LOG="${RUST_LOG:-info,jetfn=info}"

nats_pid=""
redis_pid=""
nats_origin="external, from NATS_URL"
redis_origin="external, from REDIS_URL"
declare -a function_pids=()
declare -A function_names=()
cleaned_up=0

say() {
    printf 'dev: %s\n' "$*" >&2
}

# Long-lived children run in their own session when possible (`setsid`), so
# a Ctrl-C in the terminal reaches only this script, which then stops
# everything in order. Used as a plain word prefix (not a function) so that
# `$!` is the child's own pid.
detached=()
if command -v setsid >/dev/null 2>&1; then
    detached=(setsid)
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Ready if our nats-server (by name) greets us with JetStream enabled.
# shellcheck disable=SC2329 # invoked through wait_ready
probe_nats() (
    port=$1 name=$2
    exec 3<"/dev/tcp/127.0.0.1/$port" || exit 1
    read -r -t 2 line <&3 || exit 1
    [[ $line == INFO* && $line == *"\"server_name\":\"$name\""* && $line == *'"jetstream":true'* ]]
) 2>/dev/null

# Ready if PING answers PONG and INFO names our redis-server process.
# shellcheck disable=SC2329 # invoked through wait_ready
probe_redis() (
    port=$1 pid=$2
    exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
    printf 'PING\r\nINFO server\r\n' >&3
    read -r -t 2 pong <&3 || exit 1
    [[ $pong == +PONG* ]] || exit 1
    while read -r -t 2 line <&3; do
        if [[ $line == process_id:* ]]; then
            line=${line#process_id:}
            [[ $line == "$pid" || $line == "$pid"[[:space:]] ]]
            exit
        fi
    done
    exit 1
) 2>/dev/null

# wait_ready NAME PID LOG PROBE ARGS...: polls PROBE every 20 ms for up to
# 10 s while PID lives. On failure prints the log tail.
wait_ready() {
    local name=$1 pid=$2 log=$3 i
    shift 3
    for ((i = 0; i < 500; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            say "$name exited during startup; last lines of $log:"
            tail -n 20 "$log" >&2 || true
            return 1
        fi
        if "$@"; then
            return 0
        fi
        sleep 0.02
    done
    say "$name not ready within 10 s; last lines of $log:"
    tail -n 20 "$log" >&2 || true
    return 1
}

# stop_pid PID NAME [GRACE_SECONDS]: SIGTERM, wait, SIGKILL if needed.
stop_pid() {
    local pid=$1 name=$2 grace=${3:-10} i
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 10; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name did not stop within ${grace} s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    ((cleaned_up)) && return 0
    cleaned_up=1
    local pid
    for pid in "${function_pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            say "stopping ${function_names[$pid]} (pid $pid)"
        fi
        stop_pid "$pid" "${function_names[$pid]}" 15
    done
    if [[ -n $nats_pid ]]; then
        say "stopping nats-server (pid $nats_pid)"
        stop_pid "$nats_pid" nats-server
    fi
    if [[ -n $redis_pid ]]; then
        say "stopping redis-server (pid $redis_pid)"
        stop_pid "$redis_pid" redis-server
    fi
    rm -f "$state/nats.url" "$state/redis.url"
}

# shellcheck disable=SC2329 # invoked by the trap
on_signal() {
    printf '\n' >&2
    say "shutting down"
    cleanup
    trap - EXIT
    exit 130
}
trap on_signal INT TERM
trap cleanup EXIT

start_nats() {
    local port name="jetfn-dev-$$" attempt log="$state/nats.log"
    ensure_nats_server
    mkdir -p "$state/nats"
    : >"$log"
    for attempt in 1 2 3; do
        port=$(free_port)
        echo "=== dev.sh: starting nats-server on 127.0.0.1:$port (attempt $attempt) ===" >>"$log"
        "${detached[@]}" "$JETFN_NATS_SERVER" -a 127.0.0.1 -p "$port" -js -sd "$state/nats" \
            --server_name "$name" >>"$log" 2>&1 &
        nats_pid=$!
        if wait_ready nats-server "$nats_pid" "$log" probe_nats "$port" "$name"; then
            export NATS_URL="nats://127.0.0.1:$port"
            nats_origin="private, pid $nats_pid"
            return 0
        fi
        stop_pid "$nats_pid" nats-server 2
        nats_pid=""
    done
    say "could not start nats-server (see $log)"
    return 1
}

start_redis() {
    local port attempt log="$state/redis.log"
    ensure_redis_server
    mkdir -p "$state/redis"
    : >"$log"
    for attempt in 1 2 3; do
        port=$(free_port)
        echo "=== dev.sh: starting redis-server on 127.0.0.1:$port (attempt $attempt) ===" >>"$log"
        "${detached[@]}" "$JETFN_REDIS_SERVER" --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
            --daemonize no --dir "$state/redis" >>"$log" 2>&1 &
        redis_pid=$!
        if wait_ready redis-server "$redis_pid" "$log" probe_redis "$port" "$redis_pid"; then
            export REDIS_URL="redis://127.0.0.1:$port"
            redis_origin="private, pid $redis_pid"
            return 0
        fi
        stop_pid "$redis_pid" redis-server 2
        redis_pid=""
    done
    say "could not start redis-server (see $log)"
    return 1
}

banner() {
    local line="────────────────────────────────────────────────────────────────────"
    cat >&2 <<EOF
$line
 jetfn dev
   NATS   $NATS_URL  ($nats_origin)
   Redis  $REDIS_URL  ($redis_origin)
   logs   $rel_state/nats.log, $rel_state/redis.log (private servers only)
   store  $rel_state/nats/ (JetStream; delete it to start from scratch)
   functions: $FUNCTIONS  (RUST_LOG=$RUST_LOG)

 Send a first command, from another terminal:
   ./just send account.alice.open '{"owner":"Alice","initial_deposit":100}'
 or with the nats CLI:
   nats req cmd.account.alice.deposit '{"amount":50}' -s $NATS_URL

 Then read the model in Redis:
   redis-cli -u $REDIS_URL GET '{account-balances}:active'            # live version, e.g. 1
   redis-cli -u $REDIS_URL HGETALL '{account-balances}:g1:account:alice'
   redis-cli -u $REDIS_URL XREAD BLOCK 0 STREAMS '{account-balances}:g1:changes' '\$'
 Rebuild the read model without downtime:
   NATS_URL=$NATS_URL REDIS_URL=$REDIS_URL target/debug/account-projection --rebuild

 Ctrl-C stops the functions, then the private servers.
$line
EOF
}

main() {
    local -a packages=()
    local name pid status
    mkdir -p "$state"
    for name in $FUNCTIONS; do
        packages+=(-p "$name")
    done
    say "building: cargo build ${packages[*]}"
    cargo build "${packages[@]}"

    if [[ -z ${NATS_URL:-} ]]; then
        start_nats
    fi
    if [[ -z ${REDIS_URL:-} ]]; then
        start_redis
    fi
    printf '%s\n' "$NATS_URL" >"$state/nats.url"
    printf '%s\n' "$REDIS_URL" >"$state/redis.url"
    banner

    for name in $FUNCTIONS; do
        "${detached[@]}" "$target_dir/debug/$name" &
        pid=$!
        function_pids+=("$pid")
        function_names[$pid]=$name
        say "started $name (pid $pid)"
    done

    # Run until Ctrl-C (the trap) or until a function exits by itself.
    status=0
    wait -n "${function_pids[@]}" || status=$?
    for pid in "${function_pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            say "${function_names[$pid]} exited (status $status); stopping the dev environment"
            break
        fi
    done
    cleanup
    exit "$status"
}

main "$@"
