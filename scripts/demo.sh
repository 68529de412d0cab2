#!/usr/bin/env bash
# The README's first command, from a fresh machine: installs QEMU and the
# other system packages, builds the tiny guest (a distribution kernel and
# an initramfs with the ticker workload), then runs the VM demo: the guest
# moves live between two daemons on this machine and back.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/guest/build.sh >/dev/null
cargo run --release -p understudy -- demo "$@"
