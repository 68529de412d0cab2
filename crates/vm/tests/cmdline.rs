//! Golden expectations for the QEMU command line.

use std::path::Path;

use understudy_vm::{AccelKind, LaunchMode, VmPaths, VmSpec, qemu_args};

const SPEC: &str = r#"
name = "g1"
cpus = 2
memory = "128M"
extra_args = ["-device", "virtio-rng-pci"]

[boot]
kernel = "/k/vmlinuz"
initrd = "/k/initrd.gz"
append = "console=ttyS0 mode=idle"

[[disks]]
name = "root"
socket = "/run/nbd.sock"
export = "g1-root"

[[disks]]
name = "data"
socket = "/run/other.sock"
readonly = true

[paths]
ram_dir = "/dev/shm"
state_dir = "/run/vm/g1"
"#;

fn build(spec: &VmSpec, accel: AccelKind, mode: LaunchMode) -> String {
    let paths = VmPaths::resolve(spec, Path::new("/unused")).expect("paths");
    qemu_args(spec, &paths, accel, mode).join(" ")
}

#[test]
fn kernel_boot_with_disks_and_extra_args() {
    let spec = VmSpec::from_toml(SPEC).expect("parse");
    spec.check_shape().expect("shape");
    let got = build(&spec, AccelKind::Tcg, LaunchMode::default());
    let want = "-accel tcg -machine pc,memory-backend=mem -m 128 \
        -object memory-backend-file,id=mem,size=128M,mem-path=/dev/shm/g1.ram,share=on \
        -smp 2 -nodefaults -vga none -display none -no-reboot \
        -serial file:/run/vm/g1/serial.log \
        -qmp unix:/run/vm/g1/qmp.sock,server=on,wait=off \
        -kernel /k/vmlinuz -initrd /k/initrd.gz -append console=ttyS0 mode=idle \
        -blockdev driver=nbd,node-name=d0,server.type=unix,server.path=/run/nbd.sock,export=g1-root \
        -device virtio-blk-pci,drive=d0,id=vd0 \
        -blockdev driver=nbd,node-name=d1,server.type=unix,server.path=/run/other.sock,export=data,read-only=on \
        -device virtio-blk-pci,drive=d1,id=vd1 \
        -device virtio-rng-pci";
    assert_eq!(got, want);
}

#[test]
fn incoming_paused_kvm() {
    let spec = VmSpec::from_toml(SPEC).expect("parse");
    let mode = LaunchMode {
        incoming: true,
        paused: true,
        reuse_ram: true,
    };
    let got = build(&spec, AccelKind::Kvm, mode);
    assert!(got.starts_with("-accel kvm "), "{got}");
    assert!(
        got.ends_with(
            "-device virtio-blk-pci,drive=d1,id=vd1 -S -incoming defer -device virtio-rng-pci"
        ),
        "{got}"
    );
}

#[test]
fn disk_boot_has_no_kernel_and_a_boot_index() {
    let spec = VmSpec::from_toml(
        r#"
        name = "b"
        [boot]
        disk = "os"
        [[disks]]
        name = "os"
        socket = "/run/nbd.sock"
        "#,
    )
    .expect("parse");
    spec.check_shape().expect("shape");
    let paths = VmPaths::resolve(&spec, Path::new("/run/vms")).expect("paths");
    let args = qemu_args(&spec, &paths, AccelKind::Tcg, LaunchMode::default());
    let s = args.join(" ");
    assert!(!s.contains("-kernel") && !s.contains("-append"), "{s}");
    assert!(s.contains("-m 256 "), "default memory: {s}");
    assert!(s.contains("-smp 1 "), "default cpus: {s}");
    assert!(
        s.contains("-qmp unix:/run/vms/b/qmp.sock,server=on,wait=off"),
        "{s}"
    );
    assert!(
        s.ends_with("-device virtio-blk-pci,drive=d0,id=vd0,bootindex=0"),
        "{s}"
    );
    // The append string is one argument even with spaces.
    let spec = VmSpec::from_toml(SPEC).expect("parse");
    let paths = VmPaths::resolve(&spec, Path::new("/x")).expect("paths");
    let args = qemu_args(&spec, &paths, AccelKind::Tcg, LaunchMode::default());
    let i = args.iter().position(|a| a == "-append").expect("append");
    assert_eq!(args[i + 1], "console=ttyS0 mode=idle");
}
