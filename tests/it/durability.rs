//! What `close()` and `fsync()` acknowledged is kept, and a failure is reported to whoever
//! wrote: regression tests for paths where that was broken (issue 9).
//!
//! One test at a time: several kill daemons or depend on when a commit happens, and a fork by
//! another test thread (cp, dfs status) closes inherited descriptors, which is a commit.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use dfs_tests::{Cluster, close, locate, write_file};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A rewrite starts from a copy of the chunk's piece (its base). If the base is deleted
/// while the new piece's bytes are still arriving (a move, a trim, another mount's commit),
/// the write must still complete from the base as it was when the write started.
#[test]
fn a_rewrite_survives_its_base_being_deleted_before_the_stream_ends() {
    let _serial = serial();
    let mut cluster = Cluster::start(1);
    let mnt = cluster.mount();
    let other = cluster.mount();
    let path = mnt.join("f");
    let original = vec![b'a'; 100];
    write_file(&path, &original).unwrap();
    let located = locate(&cluster, std::slice::from_ref(&path));
    let base = located[0].chunks[0].piece;
    let base_file = cluster.piece_path("storage-1", base);
    assert!(base_file.exists());

    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"Z", 8).unwrap();
    // The write is streaming (small pieces are gathered until the stream ends); its base goes.
    fs::remove_file(&base_file).unwrap();
    close(f).expect("close of a rewrite whose base was deleted meanwhile");
    let mut want = original.clone();
    want[8] = b'Z';
    assert_eq!(fs::read(other.join("f")).unwrap(), want);
}

/// A daemon restarted with another fanout would look for every piece under another name
/// (and serve piece 36's bytes as piece 16's, checksums valid): it refuses to start instead,
/// saying which fanout the data directory has.
#[test]
fn a_daemon_refuses_to_start_with_a_fanout_its_data_was_not_laid_out_with() {
    let _serial = serial();
    let mut cluster = Cluster::start(1);
    let mnt = cluster.mount();
    for i in 0..40 {
        write_file(&mnt.join(format!("f{i}")), format!("file {i}").as_bytes()).unwrap();
    }
    cluster.kill_daemon("storage-1");
    let out = std::process::Command::new(dfs_tests::bin("dfs-storaged"))
        .args(["--config"])
        .arg(cluster.config_path())
        .args(["--name", "storage-1", "--fanout", "16"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with the wrong fanout: {stderr}");
    assert!(stderr.contains("fanout 36") && stderr.contains("fanout 16"), "{stderr}");
    // With the right one, every file is still there.
    cluster.start_daemon("storage-1");
    cluster.wait_all_up();
    for i in 0..40 {
        assert_eq!(
            fs::read(mnt.join(format!("f{i}"))).unwrap(),
            format!("file {i}").as_bytes()
        );
    }
}
