//! The VM spec: what to run, parsed from TOML and checked before QEMU starts.
//!
//! ```toml
//! name = "demo"
//! cpus = 1
//! memory = "256M"
//!
//! [boot]
//! kernel = "/var/lib/understudy/vmlinuz"
//! initrd = "/var/lib/understudy/initrd.gz"
//! append = "console=ttyS0 panic=-1 mode=counter"
//!
//! [[disks]]
//! name = "root"
//! socket = "/run/understudy/nbd.sock"
//! export = "demo-root"
//! ```
//!
//! Parsing ([`VmSpec::from_toml`]) checks types and refuses unknown fields;
//! [`VmSpec::validate`] checks everything else (bounds, names, files, room
//! for the RAM file) so that a bad spec never starts a QEMU process.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::SpecError;

/// Smallest guest RAM accepted, in MiB: less does not boot a Linux kernel.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest RAM accepted, in MiB (64 GiB). The RAM file lives in a
/// tmpfs and every memory round scans it; beyond this the scan alone takes
/// longer than any sane downtime budget on one core.
pub const MAX_MEMORY_MIB: u64 = 64 << 10;
/// Most virtual CPUs accepted.
pub const MAX_CPUS: u32 = 64;
/// Longest VM or disk name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A VM to run. Every field is documented with its default; fields without
/// one are required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with
    /// `.` or `-`. It names the RAM file (`RAM_DIR/NAME.ram`) and the state
    /// directory. Required.
    pub name: String,
    /// Virtual CPUs, 1 to 64. Default: 1.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Guest RAM: a number of MiB (`256`) or a size string (`"256M"`,
    /// `"1G"`, `"512MiB"`), 16 MiB to 64 GiB. Default: 256 MiB.
    #[serde(default = "default_memory")]
    pub memory: MemorySize,
    /// QEMU machine type (`-machine`). Default: `pc` (`microvm` hangs in
    /// TSC calibration about 4 boots in 10 under TCG).
    #[serde(default = "default_machine")]
    pub machine: String,
    /// Accelerator. Default: `tcg`.
    #[serde(default)]
    pub accel: Accel,
    /// How the guest boots. Required.
    pub boot: Boot,
    /// Disks, each served over NBD on a Unix socket, in guest order
    /// (`/dev/vda`, `/dev/vdb`, ...). Default: none.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Extra QEMU arguments, appended last. Flags the runner manages
    /// (`-qmp`, `-serial`, `-m`, `-daemonize`, ...) are refused.
    /// Default: none.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Where the runner puts the VM's files. Default: see [`PathsSpec`].
    #[serde(default)]
    pub paths: PathsSpec,
}

/// Which accelerator runs the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Software emulation: works everywhere, about 10x to 50x slower.
    #[default]
    Tcg,
    /// KVM: refused unless the runner allows it and `/dev/kvm` opens.
    Kvm,
    /// KVM when allowed and available, else TCG.
    Auto,
}

/// How the guest boots: a kernel (with an optional initrd and command
/// line) or one of the spec's disks, never both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// Kernel image (absolute path) for direct boot (`-kernel`).
    /// Default: none.
    pub kernel: Option<PathBuf>,
    /// Initramfs (absolute path), only with `kernel`. Default: none.
    pub initrd: Option<PathBuf>,
    /// Kernel command line, only with `kernel`. Default:
    /// [`DEFAULT_APPEND`] (serial console; a panic reboots, which
    /// `-no-reboot` turns into an exit the runner reports).
    pub append: Option<String>,
    /// Name of the disk to boot from through the firmware, instead of a
    /// kernel. Default: none.
    pub disk: Option<String>,
}

/// Kernel command line used when `boot.append` is not given.
pub const DEFAULT_APPEND: &str = "console=ttyS0 panic=-1";

/// One disk: an NBD export on a Unix socket that QEMU connects to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The disk's name (same rules as the VM name). Required.
    pub name: String,
    /// The NBD server's Unix socket (absolute path, at most 107 bytes).
    /// Required.
    pub socket: PathBuf,
    /// The export name on that server. Default: the disk's name.
    pub export: Option<String>,
    /// Attach read-only. Default: false.
    #[serde(default)]
    pub readonly: bool,
}

impl DiskSpec {
    /// The export name QEMU asks for.
    pub fn export_name(&self) -> &str {
        self.export.as_deref().unwrap_or(&self.name)
    }
}

/// Where the VM's files go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsSpec {
    /// Directory of the guest RAM file `NAME.ram` (absolute; a tmpfs, so
    /// that RAM is not written to a real disk). Default: `/dev/shm`.
    #[serde(default = "default_ram_dir")]
    pub ram_dir: PathBuf,
    /// Directory of the QMP socket, the serial log and the QEMU log
    /// (absolute; created if missing). Default: the runner's state root
    /// joined with the VM name.
    pub state_dir: Option<PathBuf>,
}

impl Default for PathsSpec {
    fn default() -> Self {
        Self {
            ram_dir: default_ram_dir(),
            state_dir: None,
        }
    }
}

fn default_cpus() -> u32 {
    1
}
fn default_memory() -> MemorySize {
    MemorySize::from_mib(256)
}
fn default_machine() -> String {
    "pc".to_string()
}
fn default_ram_dir() -> PathBuf {
    PathBuf::from("/dev/shm")
}

/// Guest RAM size, a whole number of MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemorySize(u64);

impl MemorySize {
    /// A size of `mib` MiB.
    pub const fn from_mib(mib: u64) -> Self {
        Self(mib)
    }
    /// The size in MiB.
    pub const fn mib(self) -> u64 {
        self.0
    }
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0 << 20
    }
    /// Parse `"256"`, `"256M"`, `"256MiB"`, `"1G"`, `"1GiB"` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let n: u64 = s[..split].parse().ok()?;
        let shift = match s[split..].trim().to_ascii_lowercase().as_str() {
            "" | "m" | "mb" | "mib" => 0,
            "g" | "gb" | "gib" => 10,
            _ => return None,
        };
        n.checked_mul(1 << shift).map(Self)
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0)
    }
}

impl Serialize for MemorySize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MemoryVisitor)
    }
}

struct MemoryVisitor;

impl serde::de::Visitor<'_> for MemoryVisitor {
    type Value = MemorySize;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of MiB (256) or a size string (\"256M\", \"1G\")")
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MemorySize, E> {
        Ok(MemorySize(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MemorySize, E> {
        u64::try_from(v)
            .map(MemorySize)
            .map_err(|_| E::custom("memory must not be negative"))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MemorySize, E> {
        MemorySize::parse(v).ok_or_else(|| {
            E::custom(format!(
                "memory {v:?} is not a size; write MiB as a number (256) or a string like \"256M\" or \"1G\""
            ))
        })
    }
}

impl VmSpec {
    /// Parse a spec from TOML text. Only types and field names are checked
    /// here; call [`VmSpec::validate`] before using it.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        toml::from_str(text).map_err(SpecError::Parse)
    }

    /// The spec as TOML (for `vm status --spec` and tests).
    pub fn to_toml(&self) -> Result<String, SpecError> {
        toml::to_string(self).map_err(SpecError::Serialize)
    }

    /// A spec with defaults for a direct kernel boot.
    pub fn with_kernel(name: &str, kernel: &Path) -> Self {
        Self {
            name: name.to_string(),
            cpus: default_cpus(),
            memory: default_memory(),
            machine: default_machine(),
            accel: Accel::default(),
            boot: Boot {
                kernel: Some(kernel.to_path_buf()),
                ..Boot::default()
            },
            disks: Vec::new(),
            extra_args: Vec::new(),
            paths: PathsSpec::default(),
        }
    }

    /// The guest RAM file: `ram_dir/NAME.ram`.
    pub fn ram_file(&self) -> PathBuf {
        self.paths.ram_dir.join(format!("{}.ram", self.name))
    }

    /// The kernel command line QEMU gets (only meaningful with a kernel).
    pub fn append(&self) -> &str {
        self.boot.append.as_deref().unwrap_or(DEFAULT_APPEND)
    }

    /// Check everything that can be checked before QEMU starts: first the
    /// spec's own rules ([`VmSpec::check_shape`]), then the host (files
    /// readable, sockets present, room for the RAM file).
    pub fn validate(&self) -> Result<(), SpecError> {
        self.check_shape()?;
        crate::validate::check_host(self)
    }

    /// The spec's own rules, without touching the file system: bounds,
    /// names, boot source, duplicate disks, paths and managed flags.
    pub fn check_shape(&self) -> Result<(), SpecError> {
        crate::validate::check_shape(self)
    }
}
