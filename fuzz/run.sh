#!/usr/bin/env bash
# Runs every cargo-fuzz target for ${FUZZ_SECONDS:-30} seconds on stable Rust
# (RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the nightly-only flags it needs).
# Installs cargo-fuzz if missing. Builds in ${CARGO_TARGET_DIR:-<repo>/target-fuzz}.
# New inputs are added to fuzz/corpus/<target>/; crashes land in fuzz/artifacts/<target>/
# and make this script fail.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(pwd)/../target-fuzz}"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
targets=(wire_decode ingest api_json)
cargo fuzz build -O
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== fuzzing $t for ${SECONDS_PER_TARGET}s"
  if ! cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz target $t failed: the input is in fuzz/artifacts/$t/ (reproduce: cargo fuzz run $t <file>)" >&2
    exit 1
  fi
  grep -E "^(stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb)" "$log" || true
done
echo "fuzzing done: ${#targets[@]} targets x ${SECONDS_PER_TARGET}s"
