//! Everything killed with SIGKILL and started again: every acknowledged byte is back.

use std::process::Command;

use dfs_tests::{Cluster, data, run};

#[test]
fn all_processes_killed_and_restarted_lose_nothing() {
    let mut cluster = Cluster::start(3);
    let mnt = cluster.mount();
    let local = tempfile::tempdir().unwrap();
    let files: Vec<(String, u64)> = vec![
        ("empty".into(), 0),
        ("small".into(), 1234),
        ("chunky".into(), (20 << 20) + 17),
        ("dir/nested/file".into(), 100_000),
    ];
    std::fs::create_dir_all(mnt.join("dir/nested")).unwrap();
    for (i, (name, size)) in files.iter().enumerate() {
        let src = local.path().join(i.to_string());
        data::write_file(&src, *size, i as u64 + 7);
        run(Command::new("cp").arg(&src).arg(mnt.join(name)));
    }
    for i in 0..200 {
        std::fs::write(mnt.join(format!("dir/many{i:03}")), format!("file {i}")).unwrap();
    }
    std::os::unix::fs::symlink("nested/file", mnt.join("dir/link")).unwrap();
    std::fs::hard_link(mnt.join("small"), mnt.join("small-hardlink")).unwrap();

    // Kill everything, mount included, with no chance to flush or say goodbye.
    cluster.kill_mount(&mnt);
    cluster.kill_metaserver();
    for name in cluster.daemon_names() {
        cluster.kill_daemon(&name);
    }
    cluster.start_metaserver();
    for name in cluster.daemon_names() {
        cluster.start_daemon(&name);
    }
    cluster.wait_all_up();
    let report = cluster.status();
    assert!(report.nodes.iter().all(|n| n.node.up), "{report:?}");
    cluster.mount_at(&mnt);

    for (i, (name, size)) in files.iter().enumerate() {
        run(Command::new("cmp")
            .arg(local.path().join(i.to_string()))
            .arg(mnt.join(name)));
        assert_eq!(std::fs::metadata(mnt.join(name)).unwrap().len(), *size);
    }
    for i in 0..200 {
        assert_eq!(
            std::fs::read_to_string(mnt.join(format!("dir/many{i:03}"))).unwrap(),
            format!("file {i}")
        );
    }
    assert_eq!(
        std::fs::read_link(mnt.join("dir/link")).unwrap().to_str(),
        Some("nested/file")
    );
    assert_eq!(
        std::fs::read(mnt.join("small-hardlink")).unwrap(),
        std::fs::read(mnt.join("small")).unwrap()
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(mnt.join("small")).unwrap().nlink(), 2);
}
