#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then
# checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if [ -x scripts/guest/build.sh ]; then
  # Guest kernel + initramfs for the tests that boot a real QEMU guest.
  bash scripts/guest/build.sh
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace 2>&1 | tee target/test-output.log
(cd fuzz && cargo check --quiet)
