//! The quick start: `dfs up` brings a whole cluster up, and back with the same data.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dfs_tests::{bin, wait_until};

fn up(dir: &std::path::Path, mnt: &std::path::Path) -> Child {
    Command::new(bin("dfs"))
        .arg("up")
        .arg(mnt)
        .arg("--data-dir")
        .arg(dir)
        .arg("--storage-daemons")
        .arg("3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dfs up")
}

fn stop(mut child: Child, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let mut waited = 0;
    while child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
        assert!(waited < 300, "dfs up did not stop within 30s");
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "dfs up exited with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dfs_up_runs_a_cluster_and_brings_the_same_data_back() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let data_dir = dir.path().join("cluster");
    let child = up(&data_dir, &mnt);
    wait_until("dfs up to mount", Duration::from_secs(60), || {
        dfs_common::process::is_dfs_mounted(&mnt)
    });
    std::fs::create_dir(mnt.join("docs")).unwrap();
    std::fs::write(mnt.join("docs/readme.txt"), b"kept across restarts").unwrap();

    // The generated config works for dfs status and for a second mount.
    let config = data_dir.join("dfs.toml");
    let status = Command::new(bin("dfs"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{status:?}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("storage-") && l.contains(" up "))
            .count(),
        3,
        "{text}"
    );

    stop(child, libc::SIGINT);
    assert!(!dfs_common::process::is_dfs_mounted(&mnt), "still mounted after Ctrl-C");
    let left = Command::new("pgrep")
        .arg("-f")
        .arg(data_dir.to_str().unwrap())
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "processes left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );

    let child = up(&data_dir, &mnt);
    wait_until("dfs up to mount again", Duration::from_secs(60), || {
        dfs_common::process::is_dfs_mounted(&mnt)
    });
    assert_eq!(
        std::fs::read(mnt.join("docs/readme.txt")).unwrap(),
        b"kept across restarts"
    );
    stop(child, libc::SIGTERM);
    assert!(!dfs_common::process::is_dfs_mounted(&mnt));
}
