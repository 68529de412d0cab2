#!/usr/bin/env bash
# Build the guest kernel + initramfs used to record memory traces.
# Idempotent: artefacts are cached in $UNDERSTUDY_GUEST_CACHE
# (default ~/.cache/understudy/guest) and rebuilt only when missing or when
# the workload sources changed.
#
# Needs: apt-get (kernel download), dpkg-deb, gcc, busybox-static, cpio,
# gzip. Prints the cache directory on success.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${UNDERSTUDY_GUEST_CACHE:-$HOME/.cache/understudy/guest}"
mkdir -p "$cache"

need() { command -v "$1" >/dev/null || { echo "build.sh: $1 is missing; install it (see docs/memory-sync.md)" >&2; exit 1; }; }
need gcc; need cpio; need gzip; need dpkg-deb
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "build.sh: busybox-static is missing: apt-get install -y busybox-static" >&2; exit 1; }

# 1. Kernel: the version linux-image-cloud-amd64 currently depends on.
if [ ! -s "$cache/vmlinuz" ]; then
    pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
    if [ -z "$pkg" ]; then
        apt-get update >/dev/null
        pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
    fi
    [ -n "$pkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x ./*.deb kpkg)
    cp "$tmp"/kpkg/boot/vmlinuz-* "$cache/vmlinuz.tmp"
    mv "$cache/vmlinuz.tmp" "$cache/vmlinuz"
    echo "$pkg" > "$cache/kernel-package"
fi

# 2. Workloads + initramfs, rebuilt when sources change.
stamp="$(cat "$root"/workloads/*.c "$root"/workloads/*.h "$here/build.sh" | sha256sum | cut -c1-16)"
if [ ! -s "$cache/initrd.gz" ] || [ "$(cat "$cache/initrd.stamp" 2>/dev/null)" != "$stamp" ]; then
    work="$(mktemp -d)"
    mkdir -p "$work"/initrd/{bin,proc,sys,dev,tmp}
    for src in "$root"/workloads/*.c; do
        name="$(basename "$src" .c)"
        gcc -static -O2 -Wall -o "$work/initrd/bin/$name" "$src"
    done
    cp "$busybox" "$work/initrd/bin/busybox"
    cat > "$work/initrd/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mode=idle
for w in $(cat /proc/cmdline); do case "$w" in mode=*) mode="${w#mode=}";; esac; done
echo "GUEST-UP mode=$mode"
if [ -x "/bin/$mode" ]; then
    "/bin/$mode"
else
    echo "WORKLOAD-START idle"
    while true; do sleep 1; done
fi
poweroff -f
INIT
    chmod +x "$work/initrd/init"
    (cd "$work/initrd" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$cache/initrd.gz.tmp")
    mv "$cache/initrd.gz.tmp" "$cache/initrd.gz"
    echo "$stamp" > "$cache/initrd.stamp"
    rm -rf "$work"
fi
echo "$cache"
