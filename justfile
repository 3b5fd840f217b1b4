# jetfn tasks. On a fresh machine use ./just (it installs `just` first).

set positional-arguments

# List the recipes.
default:
    @{{just_executable()}} --justfile {{justfile()}} --list --unsorted

# Private NATS + Redis on free ports and the function binaries, until Ctrl-C.
dev:
    @scripts/dev.sh

# What CI runs: fmt check, clippy, build, doc tests, all tests (ARGS go to the test runner).
test *ARGS:
    @scripts/test.sh "$@"

# Fuzz each cargo-fuzz target for 10 minutes (or SECONDS), or only TARGETS: see fuzz/README.md.
fuzz SECONDS="600" *TARGETS:
    @scripts/fuzz.sh --seconds "$@"

# Send a command: just send account.alice.open '{"owner":"Alice"}' [--id ID] [--server URL]
send SUBJECT BODY *ARGS:
    @python3 scripts/send.py "$@"

# Format all Rust code.
fmt:
    cargo fmt --all

# Lint: format check and clippy with warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Build every crate and binary of the workspace.
build:
    cargo build --workspace

# The command path (issue 9) and projection path (issue 10) run the release function binaries,
# each next to raw NATS/JetStream/Redis limits measured in the same run. JETFN_BIN_ACCOUNT /
# JETFN_BIN_ACCOUNT_PROJECTION point at other binaries; JETFN_BENCH_SCALE=0.2 shrinks every count.
# Benchmarks, reported and never asserted: appends, command path, projection path (release build).
bench:
    cargo build --release -p account -p account-projection
    cargo bench -p jetfn-tests --bench append
    cargo bench -p jetfn-tests --bench command_path
    cargo bench -p jetfn-tests --bench projection_path

# The command path's RSS bound with 1,000,000 distinct aggregates touched (a few minutes).
bench-rss:
    cargo build --release -p account
    JETFN_BENCH_ONLY=rss JETFN_BENCH_RSS_AGGREGATES=1000000 cargo bench -p jetfn-tests --bench command_path

# Regenerate the JSON Schemas in schemas/ from the Rust types (a test fails when they drift).
schemas:
    cargo run -q -p jetfn-tests --bin jetfn-schemas

# Races wildcard expected-subject checks on the cluster at URL: why jetfn only uses literal ones.
wildcard-race URL:
    JETFN_WILDCARD_NATS_URL={{URL}} cargo nextest run -p jetfn-tests --test atomic_decisions --no-capture wildcard
