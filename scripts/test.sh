#!/usr/bin/env bash
# The full check, as CI runs it: installs missing servers, then format check,
# clippy, build, the fuzz targets (bounded), doc tests and the whole test suite
# against real servers.
#
#   scripts/test.sh [ARGS...]   # ARGS go to the test runner, e.g. a filter
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=scripts/tools.sh
source "$root/scripts/tools.sh"

ensure_nats_server
ensure_redis_server
ensure_nextest
ensure_python_client_deps
echo "jetfn: nats-server $JETFN_NATS_SERVER, redis-server $JETFN_REDIS_SERVER, tests via $JETFN_TEST_RUNNER"

step() {
    printf '\n==> %s\n' "$*"
    "$@"
}

step cargo fmt --all -- --check
step cargo clippy --workspace --all-targets -- -D warnings
# Process tests run the built binaries (target/debug/<function>).
step cargo build --workspace
# The fuzz targets (fuzz/), each for a fixed number of inputs; `just fuzz` runs them for long.
# JETFN_FUZZ_RUNS=0 skips them.
fuzz_runs=${JETFN_FUZZ_RUNS:-20000}
if [[ $fuzz_runs == 0 ]]; then
    printf '\n==> fuzz targets SKIPPED (JETFN_FUZZ_RUNS=0)\n'
else
    step scripts/fuzz.sh --runs "$fuzz_runs"
fi
# Doc tests first, so the suite's summary is the last thing printed.
step cargo test --workspace --doc
# In CI, report every failing test rather than stopping at the first.
fail_fast=()
if [[ -n ${CI:-} ]]; then
    fail_fast=(--no-fail-fast)
fi
if [[ $JETFN_TEST_RUNNER == nextest ]]; then
    step cargo nextest run --workspace "${fail_fast[@]}" "$@"
else
    step cargo test --workspace "${fail_fast[@]}" "$@"
fi
