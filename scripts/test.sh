#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then
# checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# Guest kernel + initramfs for the tests that boot a real QEMU guest; with
# UNDERSTUDY_REQUIRE_GUEST=1 those tests fail instead of skipping when the
# artefacts are missing.
bash scripts/guest/build.sh >/dev/null
bash scripts/guest/build-fs.sh >/dev/null
export UNDERSTUDY_REQUIRE_GUEST=1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The release feature set (no crate's `testing` feature, which the line
# above unifies in through dev-dependencies) must be clean too.
cargo clippy -p understudy -- -D warnings
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.log
(cd fuzz && cargo check --quiet)
