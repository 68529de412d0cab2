//! Crash-safe replacement of a small file.
//!
//! Every persistent record of understudy (bitmap snapshots, ownership and
//! generation records, memory-sync state) is replaced the same way:
//!
//! ```text
//!  write PATH.tmp ─► fsync PATH.tmp ─► rename PATH.tmp → PATH ─► fsync dir
//! ```
//!
//! After a crash at any point, `PATH` holds either its old content or the new
//! content, never a mix: the rename is atomic and the data is durable before
//! it. The directory fsync makes the rename itself durable, so a caller that
//! got `Ok` may rely on the new content surviving a power loss.
//!
//! Callers that inject faults between the steps (crash tests) pass a hook
//! that is called before each [`Step`] and may fail it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// One step of [`replace_with`], in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create (truncate) the temporary file and write the new content.
    Write,
    /// fsync the temporary file.
    SyncFile,
    /// Rename the temporary file over the target.
    Rename,
    /// fsync the directory that holds the target.
    SyncDir,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Write => "write",
            Step::SyncFile => "fsync",
            Step::Rename => "rename",
            Step::SyncDir => "fsync the directory of",
        })
    }
}

/// Whether [`replace_with`] makes the new content durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file before the rename and the directory after it.
    Durable,
    /// Atomic against a process crash only (no fsync): for state that is
    /// rebuilt after a host crash anyway.
    ProcessCrashOnly,
}

/// A failed atomic replacement. The target still holds its old content
/// (or, for a failure at [`Step::SyncDir`], possibly the new content, which
/// may not survive a power loss).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot {step} {path} while replacing it atomically; check that the directory is writable and the disk is not full"
)]
pub struct ReplaceError {
    /// The step that failed.
    pub step: Step,
    /// The file that step worked on.
    pub path: PathBuf,
    /// What the operating system said.
    #[source]
    pub source: io::Error,
}

/// The temporary file [`replace`] writes for `path`: `PATH.tmp`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Replace `path` with `data` atomically and durably.
pub fn replace(path: &Path, data: &[u8]) -> Result<(), ReplaceError> {
    replace_with(path, data, Durability::Durable, |_| Ok(()))
}

/// Replace `path` with `data` atomically; `before` runs ahead of every step
/// and an error from it fails that step (fault injection in crash tests).
pub fn replace_with(
    path: &Path,
    data: &[u8],
    durability: Durability,
    mut before: impl FnMut(Step) -> io::Result<()>,
) -> Result<(), ReplaceError> {
    let tmp = temp_path(path);
    let durable = durability == Durability::Durable;
    let fail = |step: Step, path: &Path| {
        let path = path.to_owned();
        move |source| ReplaceError { step, path, source }
    };
    let f = (|| {
        before(Step::Write)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        Ok(f)
    })()
    .map_err(fail(Step::Write, &tmp))?;
    if durable {
        before(Step::SyncFile)
            .and_then(|()| f.sync_all())
            .map_err(fail(Step::SyncFile, &tmp))?;
    }
    drop(f);
    before(Step::Rename)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(fail(Step::Rename, path))?;
    if durable {
        let dir = parent_dir(path);
        before(Step::SyncDir)
            .and_then(|()| sync_dir(&dir))
            .map_err(fail(Step::SyncDir, &dir))?;
    }
    Ok(())
}

/// Read at most `max + 1` bytes of the small file `path`, the counterpart of
/// [`replace`] for records: `None` if it does not exist. A result longer
/// than `max` means the file is larger than any valid record (the caller
/// reports it), without ever reading more than one byte past the cap.
pub fn read_capped(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    f.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

/// fsync a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("rec");
        replace(&p, b"one").expect("first");
        replace(&p, b"two").expect("second");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert!(!temp_path(&p).exists());
    }

    #[test]
    fn a_failed_step_keeps_the_old_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("rec");
        replace(&p, b"old").expect("first");
        for step in [Step::Write, Step::SyncFile, Step::Rename] {
            let err = replace_with(&p, b"new", Durability::Durable, |s| {
                if s == step {
                    Err(io::Error::other("injected"))
                } else {
                    Ok(())
                }
            })
            .expect_err("injected fault");
            assert_eq!(err.step, step);
            assert_eq!(std::fs::read(&p).expect("read"), b"old", "{step}");
        }
        let err = replace_with(&p, b"new", Durability::Durable, |s| {
            if s == Step::SyncDir {
                Err(io::Error::other("injected"))
            } else {
                Ok(())
            }
        })
        .expect_err("injected fault");
        assert_eq!(err.step, Step::SyncDir);
        assert_eq!(std::fs::read(&p).expect("read"), b"new");
    }

    #[test]
    fn read_capped_reads_small_files_and_stops_past_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("rec");
        assert!(read_capped(&p, 4).expect("missing").is_none());
        replace(&p, b"abcdefgh").expect("write");
        assert_eq!(
            read_capped(&p, 16).expect("read"),
            Some(b"abcdefgh".to_vec())
        );
        assert_eq!(read_capped(&p, 4).expect("read"), Some(b"abcde".to_vec()));
    }

    #[test]
    fn a_missing_directory_is_a_write_error() {
        let err = replace(Path::new("/nonexistent-dir/x/rec"), b"x").expect_err("no dir");
        assert_eq!(err.step, Step::Write);
        assert!(err.to_string().contains("rec.tmp"));
    }
}
