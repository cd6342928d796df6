#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a bounded time from the committed seed corpus.
# A crash fails the run; the reproducer lands in fuzz/artifacts/<target>/ — turn it into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# cargo-fuzz passes -Z flags (sanitizer instrumentation); this machine has only the stable toolchain.
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in canonical_path token_parse header_hygiene shield_classify; do
  work=$(mktemp -d)
  echo "== fuzz $target for ${secs}s"
  cargo fuzz run -O "$target" "$work" "fuzz/corpus/$target" -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 12
  rm -rf "$work"
done
