//! Where `scripts/guest/build.sh` puts the guest it builds.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The guest kernel and initramfs in one directory, named as
/// `scripts/guest/build.sh` names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestArtefacts {
    /// The kernel, `DIR/vmlinuz`.
    pub kernel: PathBuf,
    /// The initramfs with the workloads, `DIR/initrd.gz`.
    pub initrd: PathBuf,
}

impl GuestArtefacts {
    /// The artefacts in `dir` (which may not exist yet).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.gz"),
        }
    }

    /// Whether both files exist.
    pub fn exist(&self) -> bool {
        self.kernel.is_file() && self.initrd.is_file()
    }
}

/// The directory `scripts/guest/build.sh` caches the guest in, from the
/// values of `$UNDERSTUDY_GUEST_CACHE` (`cache`, which wins when set) and
/// `$HOME` (`home`; `/root` when unset): `CACHE` or
/// `HOME/.cache/understudy/guest`. The caller reads the environment.
pub fn guest_cache_dir(cache: Option<&OsStr>, home: Option<&OsStr>) -> PathBuf {
    if let Some(d) = cache {
        return PathBuf::from(d);
    }
    home.map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/understudy/guest")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_build_sh() {
        let home = Some(OsStr::new("/home/u"));
        assert_eq!(
            guest_cache_dir(None, home),
            Path::new("/home/u/.cache/understudy/guest")
        );
        assert_eq!(
            guest_cache_dir(Some(OsStr::new("/g")), home),
            Path::new("/g")
        );
        assert_eq!(
            guest_cache_dir(None, None),
            Path::new("/root/.cache/understudy/guest")
        );
        let a = GuestArtefacts::in_dir(Path::new("/g"));
        assert_eq!(a.kernel, Path::new("/g/vmlinuz"));
        assert_eq!(a.initrd, Path::new("/g/initrd.gz"));
        assert!(!a.exist());
    }
}
