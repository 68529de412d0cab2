#!/usr/bin/env bash
# Installs every system package the tests, the demo and the benchmarks use.
# Order matters: Debian's qemu-system-x86 removes the preinstalled qemu-utils,
# so qemu-utils is (re)installed after it.
set -euo pipefail
need=()
for tool in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio \
            nbdinfo:libnbd-bin nbdkit:nbdkit fio:fio mkfs.ext4:e2fsprogs gcc:gcc; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
# busybox-static provides /bin/busybox as a static binary; the dynamic
# busybox package would not run inside the guest initramfs.
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ] || ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
  $SUDO apt-get install -y -qq --no-install-recommends qemu-utils
fi
for t in qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdkit fio qemu-system-x86_64 busybox cpio mkfs.ext4 e2fsck gcc; do
  command -v "$t" >/dev/null || { echo "install-deps: $t is still missing after apt-get; install it by hand" >&2; exit 1; }
done
