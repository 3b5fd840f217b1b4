#!/usr/bin/env bash
# Runs the cargo-fuzz (libFuzzer) targets in fuzz/, each bounded.
#
#   scripts/fuzz.sh --runs N [TARGET...]      # N inputs per target (what `just test` runs)
#   scripts/fuzz.sh --seconds S [TARGET...]   # S seconds per target (`just fuzz`: 600)
#
# Without TARGETs, every target of `cargo fuzz list`. The committed inputs in
# fuzz/corpus/<target>/ (the ones that once found a bug) are replayed first and never written;
# new inputs go to fuzz/work/<target>/ (not committed), crashes to fuzz/artifacts/<target>/.
# Exits non-zero on the first panic, crash, hang (an input running over 10 s) or leak.
#
# cargo-fuzz needs nightly-only compiler flags (-Zsanitizer, -Cpasses=sancov). The machines
# have one stable toolchain, so this runs it with RUSTC_BOOTSTRAP=1, which lets a stable rustc
# take them. JETFN_FUZZ_TOOLCHAIN=nightly uses a nightly toolchain instead, where there is one.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root/fuzz"

say() {
    printf 'jetfn fuzz: %s\n' "$*" >&2
}

usage() {
    say "usage: scripts/fuzz.sh (--runs N | --seconds S) [TARGET...]"
    exit 2
}

runs=""
seconds=""
case ${1:-} in
--runs)
    runs=${2:?$(usage)}
    shift 2
    ;;
--seconds)
    seconds=${2:?$(usage)}
    shift 2
    ;;
*) usage ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    if ! cargo install --quiet cargo-fuzz --locked; then
        say "SKIPPED: cargo-fuzz could not be installed, so no fuzz target ran"
        exit "${JETFN_FUZZ_REQUIRED:-0}"
    fi
fi

toolchain=()
if [[ -n ${JETFN_FUZZ_TOOLCHAIN:-} ]]; then
    toolchain=("+$JETFN_FUZZ_TOOLCHAIN")
else
    export RUSTC_BOOTSTRAP=1
fi

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
fi

mkdir -p work
say "building the fuzz targets (a first build takes minutes)"
if ! cargo "${toolchain[@]}" fuzz build >work/build.log 2>&1; then
    tail -n 40 work/build.log >&2
    say "FAILED to build the fuzz targets (the whole log: fuzz/work/build.log)"
    exit 1
fi

limits=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
if [[ -n $runs ]]; then
    # A fixed number of inputs, and a time cap in case the machine is slow.
    limits+=("-runs=$runs" -max_total_time=120)
else
    limits+=("-max_total_time=$seconds")
fi

for target in "${targets[@]}"; do
    mkdir -p "work/$target" "corpus/$target"
    say "$target: ${runs:+$runs runs}${seconds:+$seconds s}"
    started=$SECONDS
    if ! cargo "${toolchain[@]}" fuzz run "$target" "work/$target" "corpus/$target" -- \
        "${limits[@]}" 2>"work/$target.log"; then
        tail -n 60 "work/$target.log" >&2
        say "$target FAILED; the input is in fuzz/artifacts/$target/ (replay it with" \
            "scripts/fuzz.sh's toolchain: cargo fuzz run $target fuzz/artifacts/$target/<file>)"
        exit 1
    fi
    stats=$(grep -E '^stat::(number_of_executed_units|new_units_added|peak_rss_mb)' \
        "work/$target.log" | sed 's/^stat:://' | tr -s ' ' | tr '\n' ' ')
    say "$target: ok in $((SECONDS - started)) s, $stats"
done
