//! A received disk gets the epoch journal the target daemon configures for
//! received disks, through the same stack builder as `serve --export`.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use understudy_block::DiskWrite;
use understudy_journal::{EpochDisk, FlushPolicy, JournalConfig};
use understudy_migration::{Job, TargetConfig, TargetService};

const SIZE: u64 = 16 << 20;

fn listen(node: &Arc<Node>, journal: JournalConfig) -> String {
    let mut cfg = TargetConfig::new(node.dir.clone(), peer_cfg(&node.id, KEY));
    cfg.journal = Some(journal);
    let t = TargetService::start("127.0.0.1:0", cfg, node.clone()).unwrap();
    let a = t.local_addr().to_owned();
    *node.target.lock() = Some(t);
    a
}

fn journal(policy: FlushPolicy) -> JournalConfig {
    JournalConfig {
        capacity: 1 << 20,
        policy,
        in_place_min: None,
    }
}

#[test]
fn received_disk_is_served_through_its_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start("node-a", &tmp.path().join("a"));
    let b = Node::start("node-b", &tmp.path().join("b"));
    let img = tmp.path().join("a").join("vm.img");
    create_raw(&img, SIZE);
    qemu_io(img.to_str().unwrap(), &["write -P 0xa1 0 4M".into()]);
    let expected = tmp.path().join("expected.img");
    std::fs::copy(&img, &expected).unwrap();
    a.add_export("vm", &img);
    let b_addr = listen(&b, journal(FlushPolicy::Durable));

    let job = Job::start(a.export("vm"), a.opts(&b_addr), a.clone()).unwrap();
    job.wait().unwrap().unwrap();
    let received = b.export("vm");
    let j = received
        .journal
        .clone()
        .expect("the received disk has a journal");
    assert!(EpochDisk::journal_path(&received.image).exists());

    // Clients of B write through the journal; once it stops, the image
    // holds what they wrote.
    let write = ["write -P 0x55 1M 64k".to_owned()];
    qemu_io(&b.nbd_url("vm"), &write);
    qemu_io(expected.to_str().unwrap(), &write);
    received.switch.flush().unwrap();
    j.stop().unwrap();
    assert_same(&received.image, &expected);
}

#[test]
fn an_ordered_journal_for_received_disks_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start("node-a", &tmp.path().join("a"));
    let b = Node::start("node-b", &tmp.path().join("b"));
    let img = tmp.path().join("a").join("vm.img");
    create_raw(&img, SIZE);
    a.add_export("vm", &img);
    let ordered = FlushPolicy::Ordered {
        interval: Duration::from_secs(5),
    };
    let b_addr = listen(&b, journal(ordered));
    let job = Job::start(a.export("vm"), a.opts(&b_addr), a.clone()).unwrap();
    let err = job.wait().unwrap().unwrap_err().to_string();
    assert!(err.contains("durable"), "{err}");
    assert!(a.export("vm").switch.is_local(), "A must keep serving");
    assert!(!b.dir.join("vm.img").exists());
}
