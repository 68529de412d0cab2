//! Shared helpers for the protocol tests: a catalog and a reply parser.
#![allow(dead_code)]

use understudy_nbd_proto::reply::{OptionReplyHeader, parse_option_reply};
use understudy_nbd_proto::wire::*;
use understudy_nbd_proto::{BlockSize, ExportCatalog, ExportDescriptor, Listing, MetaContext};

#[derive(Debug, Default)]
pub struct Catalog {
    pub exports: Vec<ExportDescriptor>,
}

pub fn desc(name: &str, size: u64, bitmaps: &[&str]) -> ExportDescriptor {
    let mut contexts = vec![MetaContext::BaseAllocation];
    contexts.extend(
        bitmaps
            .iter()
            .map(|b| MetaContext::DirtyBitmap((*b).to_string())),
    );
    ExportDescriptor {
        name: name.to_string(),
        description: format!("the {name} disk"),
        size,
        flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA,
        block_size: BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        },
        contexts,
        tls_only: false,
    }
}

impl Catalog {
    pub fn two() -> Self {
        Self {
            exports: vec![desc("a", 1 << 20, &["b0", "b1"]), desc("b", 4096, &[])],
        }
    }
}

impl ExportCatalog for Catalog {
    type Handle = usize;
    fn lookup(&self, name: &str) -> Option<(ExportDescriptor, usize)> {
        let name = if name.is_empty() { "a" } else { name };
        self.exports
            .iter()
            .position(|e| e.name == name)
            .map(|i| (self.exports[i].clone(), i))
    }
    fn list(&self, f: &mut dyn FnMut(Listing<'_>)) {
        for e in &self.exports {
            f(Listing {
                name: &e.name,
                description: &e.description,
                tls_only: e.tls_only,
            });
        }
    }
}

/// Split a server output buffer into option replies.
pub fn replies(mut out: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
    let mut v = Vec::new();
    while !out.is_empty() {
        let h = parse_option_reply(out[..20].try_into().unwrap()).expect("reply magic");
        let end = 20 + h.length as usize;
        v.push((h, out[20..end].to_vec()));
        out = &out[end..];
    }
    v
}

pub fn client_flags(f: u32) -> Vec<u8> {
    f.to_be_bytes().to_vec()
}

pub fn info_go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}
