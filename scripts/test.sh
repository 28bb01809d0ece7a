#!/usr/bin/env bash
# The project's one test command (README, CI): installs the real peers if missing, then
# checks formatting, builds, runs clippy with warnings as errors, and runs every unit and
# integration test of the workspace (rtmpgate, the protocol crate rtmpgate-proto in
# src/rtmp, and the tools crate rtmpgate-tools in src/tools: the client and rtmpgate-bench).
# Every step runs even when an earlier one failed (except tests after a failed build; every
# test binary runs even if one fails), and a summary at the end says which steps and tests
# failed. Exit status 0 only if all passed.
#
# Environment:
#   RTMPGATE_TEST_TIMEOUT  bound on the `cargo test` step, in minutes (default 45)
#   RUST_TEST_THREADS      tests run at once per test binary (cargo's default: one per core;
#                          most tests wait on real-time media, so 4 is faster and usually fine)
#   Anything after `--` is passed to `cargo test` (e.g. scripts/test.sh -- --test transports).
set -uo pipefail

cd "$(dirname "$0")/.."

extra=()
if [ "${1:-}" = "--" ]; then
    shift
    extra=("$@")
fi

names=()
results=()
times=()
start_all=$(date +%s)

# run NAME COMMAND...: runs one step, records its result and duration.
run() {
    local name=$1
    shift
    local t0 rc
    t0=$(date +%s)
    printf '\n==> %s: %s\n' "$name" "$*"
    "$@"
    rc=$?
    names+=("$name")
    times+=($(($(date +%s) - t0)))
    if [ $rc -eq 0 ]; then
        results+=("ok")
    else
        results+=("FAILED (exit $rc)")
    fi
    return $rc
}

# The test step, its output also kept in target/test-output.log for the summary.
run_tests() {
    mkdir -p target
    timeout --kill-after=30s "${1}m" cargo test --workspace --all-targets --no-fail-fast "${extra[@]}" 2>&1 |
        tee target/test-output.log
}

skip() {
    names+=("$1")
    times+=(0)
    results+=("skipped ($2)")
}

peers_ok=1
run "install peers" scripts/install-peers.sh || peers_ok=0
run "cargo fmt --check" cargo fmt --all -- --check
build_ok=1
run "cargo build" cargo build --workspace || build_ok=0
run "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
if [ $build_ok -eq 1 ]; then
    if [ $peers_ok -eq 0 ]; then
        echo "warning: peers are missing; integration tests that need them will fail" >&2
    fi
    minutes=${RTMPGATE_TEST_TIMEOUT:-45}
    run "cargo test" run_tests "$minutes"
else
    skip "cargo test" "build failed"
fi

failed=0
printf '\n==== rtmpgate test summary (%ss total) ====\n' $(($(date +%s) - start_all))
for i in "${!names[@]}"; do
    printf '  %-20s %-24s %4ss\n' "${names[$i]}" "${results[$i]}" "${times[$i]}"
    [ "${results[$i]}" = ok ] || failed=1
done
if [ -f target/test-output.log ] && [ "${results[${#results[@]}-1]}" != "skipped (build failed)" ]; then
    # "test result: ok. 19 passed; 0 failed; 1 ignored; ..." once per test binary.
    awk '/^test result:/ { p += $4; f += $6; i += $8; n++ }
         END { printf "  tests: %d passed, %d failed, %d ignored, in %d test binaries\n", p, f, i, n }' \
        target/test-output.log
    grep -a -E '^test .* \.\.\. FAILED$' target/test-output.log | sed 's/^test /  FAILED: /; s/ \.\.\. FAILED$//'
fi
if [ $failed -eq 0 ]; then
    echo "ALL PASSED"
else
    echo "SOME STEPS FAILED (see the output above each step)"
fi
exit $failed
