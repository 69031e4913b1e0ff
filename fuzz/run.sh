#!/usr/bin/env bash
# Bounded-time fuzzing of keas-kmi: fuzz/run.sh [seconds-per-target] (default 60).
#
# Installs cargo-fuzz if missing, seeds fuzz/corpus/ if missing, then runs each
# libFuzzer target for the given number of seconds on one job, and prints per
# target the executions (libFuzzer's stat::number_of_executed_units) and any
# crash, timeout or OOM input it left in fuzz/artifacts/<target>/.
# Not part of CI. See docs/fuzzing.md.
#
# Environment:
#   TARGETS="pem_import decrypt"   only these targets (default: all five)
#   FUZZ_BUILD_FLAGS="..."         cargo fuzz build flags (default: -a, i.e.
#                                  release + debug assertions and overflow checks)
#   FUZZ_TIMEOUT=20                seconds one input may take before it counts as a hang
set -euo pipefail

secs="${1:-60}"
case "$secs" in ''|*[!0-9]*) echo "usage: $0 [seconds-per-target]" >&2; exit 2 ;; esac
targets="${TARGETS:-pem_import dek_unwrap decrypt file_stream v2_open}"
build_flags="${FUZZ_BUILD_FLAGS:--a}"
timeout="${FUZZ_TIMEOUT:-20}"

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# cargo fuzz needs nightly-only rustc flags (-Zsanitizer, coverage passes);
# RUSTC_BOOTSTRAP lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if [ ! -d fuzz/corpus ]; then
    echo "== seeding fuzz/corpus"
    python3 fuzz/make_seeds.py
fi

echo "== building: cargo fuzz build $build_flags"
# shellcheck disable=SC2086
cargo fuzz build $build_flags

logs="fuzz/target/run-logs"
mkdir -p "$logs"
results=()
found=0
for t in $targets; do
    mkdir -p "fuzz/artifacts/$t" "fuzz/corpus/$t"
    marker="$logs/$t.start"
    touch "$marker"
    echo "== $t: ${secs}s"
    rc=0
    start=$SECONDS
    # shellcheck disable=SC2086
    cargo fuzz run $build_flags "$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -timeout="$timeout" \
        >"$logs/$t.log" 2>&1 || rc=$?
    took=$((SECONDS - start))
    execs="$(grep -a 'stat::number_of_executed_units' "$logs/$t.log" | tail -1 | awk '{print $2}')"
    rate="$(grep -a -o 'exec/s: [0-9]*' "$logs/$t.log" | tail -1 | awk '{print $2}')"
    corpus="$(find "fuzz/corpus/$t" -type f | wc -l)"
    new="$(find "fuzz/artifacts/$t" -type f -newer "$marker" | sort)"
    if [ -n "$new" ]; then
        found=1
        status="FOUND: $(echo "$new" | tr '\n' ' ')"
        why="$(grep -a -m1 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$logs/$t.log" || true)"
        [ -n "$why" ] && status="$status($why)"
    elif [ "$rc" -ne 0 ]; then
        found=1
        status="run failed (exit $rc), see $logs/$t.log"
    else
        status="no crashes"
    fi
    line="$t: ${took}s of ${secs}s, ${execs:-?} executions (last ${rate:-?} exec/s), corpus $corpus, $status"
    echo "$line"
    results+=("$line")
done

echo
echo "== summary (logs in $logs/)"
printf '%s\n' "${results[@]}"
exit "$found"
