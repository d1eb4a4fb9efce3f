//! Where data lands: balanced across daemons, in directories of at most 36 entries, and freed
//! on the daemons when files are deleted.

use std::time::Duration;

use dfs_tests::{Cluster, count_files, crowded_dirs, wait_until};

fn write_small_files(dir: &std::path::Path, n: usize, size: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let body = vec![7u8; size];
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i:05}")), &body).unwrap();
    }
}

#[test]
fn a_thousand_files_balance_across_three_daemons() {
    let mut cluster = Cluster::start(3);
    let mnt = cluster.mount();
    write_small_files(&mnt.join("many"), 1000, 4096);
    // Daemons report usage with their heartbeats: wait until all 1,000 pieces are counted.
    wait_until("daemons to report 1000 pieces", Duration::from_secs(10), || {
        cluster.status().nodes.iter().map(|n| n.usage.pieces).sum::<u64>() == 1000
    });
    let per_daemon: Vec<u64> = cluster.status().nodes.iter().map(|n| n.usage.pieces).collect();
    let mean = 1000.0 / 3.0;
    for pieces in &per_daemon {
        let off = (*pieces as f64 - mean).abs() / mean;
        assert!(
            off <= 0.20,
            "pieces per daemon {per_daemon:?}: {pieces} is {:.0}% off the mean",
            off * 100.0
        );
    }
}

#[test]
fn no_directory_exceeds_the_fanout_and_deletes_free_pieces() {
    let mut cluster = Cluster::start(3);
    let mnt = cluster.mount();
    write_small_files(&mnt.join("a"), 2500, 100);
    write_small_files(&mnt.join("b"), 500, 20_000);
    // One multi-chunk file too.
    dfs_tests::data::write_file(&mnt.join("big"), 40 << 20, 1);
    for name in cluster.daemon_names() {
        let crowded = crowded_dirs(&cluster.data_dir(&name), 36);
        assert!(crowded.is_empty(), "{name}: directories over 36 entries: {crowded:?}");
    }
    wait_until("daemons to report every piece", Duration::from_secs(10), || {
        cluster.status().nodes.iter().map(|n| n.usage.pieces).sum::<u64>() == 3005
    });
    let before = cluster.status();
    let bytes_before: u64 = before.nodes.iter().map(|n| n.usage.bytes).sum();

    // Delete most of it: pieces go away on the daemons, and the tree stays within the fanout.
    for i in 0..2500 {
        if i % 5 != 0 {
            std::fs::remove_file(mnt.join("a").join(format!("f{i:05}"))).unwrap();
        }
    }
    std::fs::remove_dir_all(mnt.join("b")).unwrap();
    std::fs::remove_file(mnt.join("big")).unwrap();
    wait_until(
        "deleted pieces to be removed from the daemons",
        Duration::from_secs(30),
        || {
            let r = cluster.status();
            r.pending_deletes == 0 && r.nodes.iter().map(|n| n.usage.pieces).sum::<u64>() == 500
        },
    );
    let after = cluster.status();
    let bytes_after: u64 = after.nodes.iter().map(|n| n.usage.bytes).sum();
    assert_eq!(
        bytes_after,
        500 * 100,
        "bytes before {bytes_before}, after {bytes_after}"
    );
    assert_eq!(after.files, 500);
    let on_disk: usize = cluster
        .daemon_names()
        .iter()
        .map(|n| count_files(&cluster.data_dir(n).join("pieces")))
        .sum();
    assert_eq!(on_disk, 500, "piece files left on the daemons' disks");
    for name in cluster.daemon_names() {
        let crowded = crowded_dirs(&cluster.data_dir(&name), 36);
        assert!(
            crowded.is_empty(),
            "{name}: directories over 36 entries after deletes: {crowded:?}"
        );
    }
}

#[test]
fn an_unlinked_file_keeps_its_data_until_its_last_close() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut cluster = Cluster::start(2);
    let mnt = cluster.mount();
    let body = dfs_tests::data::bytes(100_000, 3);
    std::fs::write(mnt.join("doomed"), &body).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("doomed"))
        .unwrap();
    std::fs::remove_file(mnt.join("doomed")).unwrap();
    assert!(!mnt.join("doomed").exists());
    std::thread::sleep(Duration::from_millis(1500));
    // Still readable and writable through the open descriptor.
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert_eq!(back, body);
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"rewritten").unwrap();
    f.sync_all().unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut head = [0u8; 9];
    f.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"rewritten");
    let report = cluster.status();
    assert_eq!(report.orphaned_files, 1);
    assert!(report.nodes.iter().map(|n| n.referenced_pieces).sum::<u64>() >= 1);
    drop(f);
    wait_until(
        "the closed orphan's pieces to be deleted",
        Duration::from_secs(20),
        || {
            let r = cluster.status();
            r.orphaned_files == 0 && r.pending_deletes == 0 && r.nodes.iter().map(|n| n.usage.pieces).sum::<u64>() == 0
        },
    );
}
