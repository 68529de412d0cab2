//! The pre-shared key: loading, checking and generating key files.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::PeerError;

/// Fewest key bytes accepted (256 bits).
pub const MIN_KEY_LEN: usize = 32;
/// Most key bytes accepted. Longer keys add nothing and a bounded read
/// keeps a wrong path (a disk image, say) from being slurped into memory.
pub const MAX_KEY_LEN: usize = 1024;
/// Largest key file read (a hex key takes two characters per byte, plus
/// whitespace).
const MAX_KEY_FILE: u64 = 4096;

/// KDF context that turns arbitrary-length key material into the 32-byte
/// key every session is derived from.
const PSK_CONTEXT: &str = "understudy-peer 2026-11-22 pre-shared key";

/// Why key material (or a key file) is not an acceptable key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    /// The path is a directory or some other non-file.
    #[error("it is not a regular file")]
    NotAFile,
    /// The file is too large to be a key file.
    #[error("it is larger than {MAX_KEY_FILE} bytes (is it really a key file?)")]
    FileTooLarge,
    /// A hex key with an odd number of digits.
    #[error("it holds an odd number ({digits}) of hex digits")]
    OddHexDigits {
        /// Hex digits in the file.
        digits: usize,
    },
    /// Fewer than [`MIN_KEY_LEN`] bytes.
    #[error("it holds {len} bytes of key, fewer than the {MIN_KEY_LEN} required")]
    TooShort {
        /// Key bytes found.
        len: usize,
    },
    /// More than [`MAX_KEY_LEN`] bytes.
    #[error("it holds {len} bytes of key, more than the {MAX_KEY_LEN} allowed")]
    TooLong {
        /// Key bytes found.
        len: usize,
    },
    /// Too few distinct byte values to be random (a placeholder).
    #[error("it uses only {distinct} distinct byte values, so it is not random")]
    NotRandom {
        /// Distinct byte values found.
        distinct: usize,
    },
}

/// A pre-shared key. Both sides of a link must hold the same one. A PSK
/// link is authenticated and integrity-checked, NOT encrypted; use
/// [`crate::PeerAuth::Tls`] to encrypt.
///
/// Only a 32-byte digest of the key material is kept in memory. `Debug`
/// never prints key bytes.
#[derive(Clone)]
pub struct PeerKey {
    derived: [u8; 32],
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerKey(<redacted>)")
    }
}

impl PeerKey {
    /// A key from raw bytes: at least [`MIN_KEY_LEN`] and at most
    /// [`MAX_KEY_LEN`] bytes that do not look like a placeholder.
    pub fn from_bytes(bytes: &[u8]) -> Result<PeerKey, PeerError> {
        check_material(bytes).map_err(|problem| PeerError::KeyInvalid {
            path: PathBuf::new(),
            problem,
        })?;
        Ok(PeerKey::derive(bytes))
    }

    fn derive(material: &[u8]) -> PeerKey {
        PeerKey {
            derived: blake3::derive_key(PSK_CONTEXT, material),
        }
    }

    /// Load a key file.
    ///
    /// A file whose content, without trailing whitespace, is only hex
    /// digits is read as hex; any other file is taken as raw key bytes.
    /// Either way at least 32 key bytes are required. Warns if the file is readable by group or
    /// others.
    pub fn load(path: &Path) -> Result<PeerKey, PeerError> {
        let read_err = |source| PeerError::KeyRead {
            path: path.to_path_buf(),
            source,
        };
        let file = fs::File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(PeerError::KeyInvalid {
                path: path.to_path_buf(),
                problem: KeyProblem::NotAFile,
            });
        }
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                "peer key file is readable by other users: chmod 600 it"
            );
        }
        let mut content = Vec::new();
        file.take(MAX_KEY_FILE + 1)
            .read_to_end(&mut content)
            .map_err(read_err)?;
        let invalid = |problem| PeerError::KeyInvalid {
            path: path.to_path_buf(),
            problem,
        };
        if content.len() as u64 > MAX_KEY_FILE {
            return Err(invalid(KeyProblem::FileTooLarge));
        }
        let material = match decode_hex(trim_end(&content)) {
            Some(hex) => hex.map_err(invalid)?,
            None => content,
        };
        check_material(&material).map_err(invalid)?;
        Ok(PeerKey::derive(&material))
    }

    /// The 32-byte key sessions are derived from.
    pub(crate) fn derived(&self) -> &[u8; 32] {
        &self.derived
    }
}

/// Create a new key file with 32 random bytes written as 64 hex digits and
/// a newline, readable only by its owner (mode 0600). Refuses to overwrite
/// an existing file. Returns the key.
pub fn generate_key_file(path: &Path) -> Result<PeerKey, PeerError> {
    let mut material = [0u8; 32];
    getrandom::fill(&mut material).map_err(|e| PeerError::Random {
        source: io::Error::other(e),
    })?;
    let mut text = String::with_capacity(65);
    for b in material {
        text.push_str(&format!("{b:02x}"));
    }
    text.push('\n');
    let write_err = |source| PeerError::KeyWrite {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write_err)?;
    // The umask can only remove bits, but set the mode explicitly in case
    // the file system ignored the creation mode.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(write_err)?;
    file.write_all(text.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(PeerKey::derive(&material))
}

fn trim_end(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(0, |p| p + 1);
    &b[..end]
}

/// Hex to bytes, or `None` if `text` is not made only of hex digits (then
/// the file is raw key bytes; 32 random bytes are all hex digits with
/// probability about 2^-42).
fn decode_hex(text: &[u8]) -> Option<Result<Vec<u8>, KeyProblem>> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    if !text.len().is_multiple_of(2) {
        return Some(Err(KeyProblem::OddHexDigits { digits: text.len() }));
    }
    let nibble = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
    Some(Ok(text
        .chunks_exact(2)
        .map(|p| (nibble(p[0]) << 4) | nibble(p[1]))
        .collect()))
}

fn check_material(bytes: &[u8]) -> Result<(), KeyProblem> {
    if bytes.len() < MIN_KEY_LEN {
        return Err(KeyProblem::TooShort { len: bytes.len() });
    }
    if bytes.len() > MAX_KEY_LEN {
        return Err(KeyProblem::TooLong { len: bytes.len() });
    }
    // Not an entropy estimate, only a guard against placeholders such as
    // 32 zero bytes or "aaaa...": 32 random bytes have about 30 distinct
    // values, and fewer than 8 happens with negligible probability.
    let mut seen = [false; 256];
    for &b in bytes {
        seen[usize::from(b)] = true;
    }
    let distinct = seen.iter().filter(|&&s| s).count();
    if distinct < 8 {
        return Err(KeyProblem::NotRandom { distinct });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_bytes(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        getrandom::fill(&mut v).unwrap();
        v
    }

    #[test]
    fn generated_file_is_private_hex_and_loads_to_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.key");
        let key = generate_key_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.trim_end().bytes().all(|c| c.is_ascii_hexdigit()));
        let loaded = PeerKey::load(&path).unwrap();
        assert_eq!(loaded.derived(), key.derived());
        // Refuses to overwrite.
        assert!(matches!(
            generate_key_file(&path),
            Err(PeerError::KeyWrite { .. })
        ));
        // Two generated keys differ.
        let other = generate_key_file(&dir.path().join("other.key")).unwrap();
        assert_ne!(other.derived(), key.derived());
    }

    #[test]
    fn hex_and_raw_forms_of_the_same_bytes_are_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = random_bytes(48);
        let raw = dir.path().join("raw");
        fs::write(&raw, &bytes).unwrap();
        let hex = dir.path().join("hex");
        let text: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
        fs::write(&hex, format!("{text}\r\n")).unwrap();
        let a = PeerKey::load(&raw).unwrap();
        let b = PeerKey::load(&hex).unwrap();
        assert_eq!(a.derived(), b.derived());
        assert_eq!(PeerKey::from_bytes(&bytes).unwrap().derived(), a.derived());
    }

    #[test]
    fn short_placeholder_and_oversized_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("short-raw", random_bytes(31), "fewer than the 32"),
            (
                "short-hex",
                b"00112233445566778899aabbccddeeff\n".to_vec(),
                "16 bytes of key",
            ),
            ("odd-hex", b"0011223344556677889\n".to_vec(), "odd number"),
            ("zeros", vec![0u8; 64], "distinct byte values"),
            ("big", random_bytes(5000), "larger than 4096"),
        ];
        for (name, content, want) in cases {
            let p = dir.path().join(name);
            fs::write(&p, &content).unwrap();
            let err = PeerKey::load(&p).unwrap_err();
            assert!(
                matches!(err, PeerError::KeyInvalid { .. }) && err.to_string().contains(want),
                "{name}: {err}"
            );
        }
        assert!(matches!(
            PeerKey::load(&dir.path().join("missing")),
            Err(PeerError::KeyRead { .. })
        ));
        assert!(matches!(
            PeerKey::load(dir.path()),
            Err(PeerError::KeyInvalid { .. })
        ));
        assert!(PeerKey::from_bytes(&random_bytes(2000)).is_err());
    }

    #[test]
    fn debug_does_not_leak_the_key() {
        let key = PeerKey::from_bytes(&random_bytes(32)).unwrap();
        assert_eq!(format!("{key:?}"), "PeerKey(<redacted>)");
    }
}
