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

# Measure appends (one message vs atomic batch vs envelope) and loads; reported, not asserted.
bench:
    cargo bench -p jetfn-tests --bench append

# Regenerate the JSON Schemas in schemas/ from the Rust types (a test fails when they drift).
schemas:
    cargo run -q -p jetfn-tests --bin jetfn-schemas
