#!/usr/bin/env bash
# Local development: private NATS (JetStream) and Redis, plus the function
# binaries, until Ctrl-C. This installs what is missing and builds, then hands
# over to `jetfn dev` (cli/src/dev.rs, servers from devtools/), which does the rest:
#
#   scripts/dev.sh            # or: ./just dev
#
# NATS_URL / REDIS_URL, if set, point at servers you run yourself; otherwise
# private ones are started on free ports, with their state in .jetfn/:
#   .jetfn/nats/  JetStream store (kept between runs; delete it to start over)
#   .jetfn/nats.log, .jetfn/redis.log  server logs
#   .jetfn/nats.url, .jetfn/redis.url  the URLs, for `jetfn` and scripts/send.py
# On Ctrl-C the functions get SIGTERM first, then the private servers are
# stopped. External servers are left alone.
set -euo pipefail

# The function binaries to run (package/binary names under functions/).
# Add new functions here.
FUNCTIONS="account,account-projection,transfer,transfer-manager,transfer-projection,bank,signup"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=scripts/tools.sh
source "$root/scripts/tools.sh"

# Every command's line too (accepted ones log at debug): a dev run is for watching them.
export RUST_LOG="${RUST_LOG:-info,jetfn::command=debug}"
[[ -n ${NATS_URL:-} ]] || ensure_nats_server
[[ -n ${REDIS_URL:-} ]] || ensure_redis_server

echo "dev: building: cargo build --workspace" >&2
cargo build --workspace
exec "${CARGO_TARGET_DIR:-$root/target}/debug/jetfn" dev --functions "$FUNCTIONS" "$@"
