#!/usr/bin/env bash
# Build the initramfs variant for the ext4 crash-consistency test
# (crates/journal/tests/ext4_guest.rs): the same kernel as build.sh, plus the
# block-device modules, and an /init that mounts /dev/vda (ext4, formatted on
# the host), runs scripts/guest/fsworkload.c on it, syncs, unmounts and powers
# off. Output: $cache/initrd-fs.gz (build.sh's initrd.gz is not touched).
#
# Idempotent: rebuilt only when the sources or this script change. Runs
# build.sh first for the kernel. Needs what build.sh needs, plus `strings`
# (binutils) to read module dependencies (the host has no kmod).
# Prints the cache directory on success.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="$(bash "$here/build.sh")"

need() { command -v "$1" >/dev/null || { echo "build-fs.sh: $1 is missing; install it (apt-get install -y $2)" >&2; exit 1; }; }
need gcc gcc; need cpio cpio; need gzip gzip; need dpkg-deb dpkg; need strings binutils

# Modules the guest needs; dependencies are added from each .ko's depends=.
# Anything built into the kernel (listed in modules.builtin) needs no module. ext4 and
# jbd2 are built into the Debian cloud kernel today, but are listed so that a
# kernel that ships them as modules still works.
wanted="virtio_pci virtio_blk crc32c_generic crc16 mbcache jbd2 ext4"

stamp="$(cat "$here/fsworkload.c" "$here/build-fs.sh" "$cache/kernel-package" | sha256sum | cut -c1-16)"
if [ -s "$cache/initrd-fs.gz" ] && [ "$(cat "$cache/initrd-fs.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$cache"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pkg="$(cat "$cache/kernel-package")"
(cd "$work" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x ./*.deb kpkg) \
    || { echo "build-fs.sh: cannot download $pkg (apt-get update, network?)" >&2; exit 1; }
# build.sh keeps the kernel of the package it resolved; check they match.
cmp -s "$work"/kpkg/boot/vmlinuz-* "$cache/vmlinuz" \
    || { echo "build-fs.sh: $pkg does not match $cache/vmlinuz; delete $cache and rerun" >&2; exit 1; }
mods="$(echo "$work"/kpkg/lib/modules/*)"

mkdir -p "$work"/initrd/{bin,proc,sys,dev,tmp,mnt,modules}
order=()
declare -A seen=()
ko_of() { find "$mods" -name "$1.ko" -o -name "$(echo "$1" | tr _ -).ko" | head -1; }
builtin() {
    # modules.builtin lists built-in drivers by path (kernel/fs/ext4/ext4.ko);
    # names may use - where the module name has _.
    grep -Eq "/($1|$(echo "$1" | tr _ -))\.ko\$" "$mods/modules.builtin"
}
visit() {
    local m="$1" ko deps d
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    ko="$(ko_of "$m")"
    if [ -z "$ko" ]; then
        builtin "$m" || { echo "build-fs.sh: module $m is neither in $pkg nor built in" >&2; exit 1; }
        return 0
    fi
    deps="$(strings -a "$ko" | sed -n 's/^depends=//p' | head -1)"
    for d in ${deps//,/ }; do visit "$d"; done
    cp "$ko" "$work/initrd/modules/$m.ko"
    order+=("$m")
}
for m in $wanted; do visit "$m"; done
printf '%s\n' "${order[@]}" > "$work/initrd/modules/order"

gcc -static -O2 -Wall -Wextra -o "$work/initrd/bin/fsworkload" "$here/fsworkload.c"
cp /bin/busybox "$work/initrd/bin/busybox"
cat > "$work/initrd/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" || echo "INSMOD-FAIL $m"
done
echo "GUEST-UP mode=fs"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if mount -t ext4 /dev/vda /mnt; then
    echo "MOUNT-OK"
    /bin/fsworkload /mnt
    sync
    umount /mnt && echo "UMOUNT-OK"
else
    echo "MOUNT-FAIL"
fi
poweroff -f
INIT
chmod +x "$work/initrd/init"
(cd "$work/initrd" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$cache/initrd-fs.gz.tmp")
mv "$cache/initrd-fs.gz.tmp" "$cache/initrd-fs.gz"
echo "$stamp" > "$cache/initrd-fs.stamp"
echo "$cache"
