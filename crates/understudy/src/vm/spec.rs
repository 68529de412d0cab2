//! The daemon's VM spec: the `understudy-vm` crate's `VmSpec`, except that
//! each disk names what the daemon serves (an export, or an image to open)
//! instead of an NBD socket, which the daemon fills in.
//!
//! Parsing goes through JSON values so that the control API takes the
//! same spec as TOML text or as a JSON object: `disks` is taken out and
//! read as [`VmDisk`]s, the rest is read as `VmSpec` (which refuses unknown
//! fields).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use understudy_vm::VmSpec;

use super::ApiError;
use crate::spec::{BitmapSpec, DEFAULT_GRANULARITY, ExportSpec, check_granularity, parse_size};

/// One disk of a daemon VM spec: either `export` (a daemon export) or
/// `path` (an image the daemon opens for the VM), never both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDisk {
    /// The disk's name (guest order follows the list). Required.
    pub name: String,
    /// An export this daemon already serves (`--export`).
    #[serde(default)]
    pub export: Option<String>,
    /// An image (absolute path) the daemon opens as export `VM-DISK`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `raw` or `qcow2`, with `path`. Default: detected.
    #[serde(default)]
    pub format: Option<String>,
    /// A dirty bitmap `NAME[:GRANULARITY]` on the image, with `path`:
    /// created on the first start, reopened with its contents later.
    #[serde(default)]
    pub bitmap: Option<String>,
    /// Attach read-only. Default: false.
    #[serde(default)]
    pub readonly: bool,
}

/// A parsed daemon spec: the VM (with no disks yet) and its disks.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// The VM; `disks` is filled in by the daemon.
    pub vm: VmSpec,
    /// The disks as the user gave them.
    pub disks: Vec<VmDisk>,
}

/// The `spec` parameter of `vm.start` as a JSON object: TOML text is
/// parsed, an object is taken as is, null is an empty spec.
pub fn spec_object(spec: Value) -> Result<Map<String, Value>, ApiError> {
    match spec {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => Ok(m),
        Value::String(text) => {
            let table: toml::Table = toml::from_str(&text)
                .map_err(|e| ApiError::invalid(format!("the VM spec is not valid TOML: {e}")))?;
            match serde_json::to_value(table) {
                Ok(Value::Object(m)) => Ok(m),
                _ => Err(ApiError::invalid(
                    "the VM spec holds a value JSON cannot carry (a TOML date?); remove it",
                )),
            }
        }
        _ => Err(ApiError::bad_request(
            "vm.start's \"spec\" is TOML text or a JSON object (docs/vm.md)",
        )),
    }
}

/// Read a spec object for the VM `name`. A `name` in the spec must match;
/// a spec without `paths.ram_dir` gets `ram_dir`.
pub fn parse(name: &str, mut m: Map<String, Value>, ram_dir: &str) -> Result<DaemonSpec, ApiError> {
    match m.get("name") {
        None => {
            m.insert("name".into(), json!(name));
        }
        Some(Value::String(n)) if n == name => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "the spec names the VM {other} but the request names it {name:?}: drop `name` from the spec or use the same name"
            )));
        }
    }
    let disks: Vec<VmDisk> = match m.remove("disks") {
        None => Vec::new(),
        Some(v) => serde_json::from_value(v).map_err(|e| {
            ApiError::invalid(format!(
                "VM spec, disks: {e}; each disk is {{name, export}} or {{name, path, format, bitmap, readonly}} (docs/vm.md)"
            ))
        })?,
    };
    let paths = m.entry("paths").or_insert_with(|| json!({}));
    if let Some(p) = paths.as_object_mut() {
        p.entry("ram_dir").or_insert_with(|| json!(ram_dir));
    }
    let vm: VmSpec = serde_json::from_value(Value::Object(m))
        .map_err(|e| ApiError::invalid(format!("VM spec: {e}; docs/vm.md lists the fields")))?;
    Ok(DaemonSpec { vm, disks })
}

/// The `--export`-style spec of a `path` disk, served as `export`.
pub fn image_export(export: &str, d: &VmDisk) -> Result<ExportSpec, ApiError> {
    let bad = |why: String| ApiError::invalid(format!("disk {:?}: {why}", d.name));
    let path = d.path.clone().ok_or_else(|| bad("no path".into()))?;
    if !path.is_absolute() {
        return Err(bad(format!(
            "path {} is not absolute; give an absolute path (the CLI resolves relative ones)",
            path.display()
        )));
    }
    let format = match &d.format {
        None => None,
        Some(f) => Some(
            f.parse()
                .map_err(|_| bad(format!("format {f:?} is unknown: use raw or qcow2")))?,
        ),
    };
    let mut bitmaps = Vec::new();
    if let Some(b) = &d.bitmap {
        if d.readonly {
            return Err(bad(
                "a readonly disk records no writes: drop bitmap or readonly".into(),
            ));
        }
        let (name, granularity) = match b.split_once(':') {
            Some((n, g)) => (
                n,
                parse_size(g)
                    .and_then(check_granularity)
                    .map_err(|e| bad(format!("bitmap {b:?}: {e}")))?,
            ),
            None => (b.as_str(), DEFAULT_GRANULARITY),
        };
        if name.is_empty() || name.len() > 255 {
            return Err(bad(format!("bitmap name {name:?} must be 1 to 255 bytes")));
        }
        bitmaps.push(BitmapSpec {
            name: name.to_string(),
            granularity,
        });
    }
    Ok(ExportSpec {
        name: export.to_string(),
        path,
        format,
        read_only: d.readonly,
        bitmaps,
        journal: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
memory = "128M"
[boot]
kernel = "/k"
[[disks]]
name = "root"
path = "/r.img"
bitmap = "b:4k"
[[disks]]
name = "data"
export = "shared"
readonly = true
"#;

    #[test]
    fn toml_and_json_give_the_same_spec() {
        let a = parse("demo", spec_object(json!(TOML)).unwrap(), "/dev/shm").unwrap();
        let obj = json!({"memory": "128M", "boot": {"kernel": "/k"}, "disks": [
            {"name": "root", "path": "/r.img", "bitmap": "b:4k"},
            {"name": "data", "export": "shared", "readonly": true}]});
        let b = parse("demo", spec_object(obj).unwrap(), "/dev/shm").unwrap();
        assert_eq!(a.vm, b.vm);
        assert_eq!(a.disks, b.disks);
        assert_eq!(a.vm.name, "demo");
        assert_eq!(a.vm.memory.mib(), 128);
        assert!(a.vm.disks.is_empty());
        assert_eq!(a.vm.paths.ram_dir, PathBuf::from("/dev/shm"));
        let e = image_export("demo-root", &a.disks[0]).unwrap();
        assert_eq!(e.bitmaps[0].granularity, 4096);
        assert_eq!(e.path, PathBuf::from("/r.img"));
    }

    #[test]
    fn refusals_say_what_to_do() {
        let err = |m: Map<String, Value>| parse("demo", m, "/dev/shm").unwrap_err().message;
        let obj = |v: Value| v.as_object().unwrap().clone();
        assert!(err(obj(json!({"name": "other"}))).contains("drop `name`"));
        assert!(err(obj(json!({"boot": {"kernal": "/k"}}))).contains("kernal"));
        assert!(err(obj(json!({"disks": [{"name": "d", "socket": "/s"}]}))).contains("socket"));
        assert!(
            spec_object(json!("memory = "))
                .unwrap_err()
                .message
                .contains("not valid TOML")
        );
        let rel = VmDisk {
            name: "d".into(),
            export: None,
            path: Some("rel.img".into()),
            format: Some("vmdk".into()),
            bitmap: None,
            readonly: false,
        };
        assert!(
            image_export("x", &rel)
                .unwrap_err()
                .message
                .contains("absolute")
        );
        let fmt = VmDisk {
            path: Some("/a.img".into()),
            ..rel
        };
        assert!(
            image_export("x", &fmt)
                .unwrap_err()
                .message
                .contains("raw or qcow2")
        );
    }
}
