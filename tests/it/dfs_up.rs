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

/// `dfs up` serves every process's metrics on loopback and prints where; `dfs metrics` reads
/// each one's request latencies (what the next performance change is measured with).
#[test]
fn dfs_up_serves_metrics_of_every_process() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let data_dir = dir.path().join("cluster");
    let mut child = up(&data_dir, &mnt);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    while !printed.iter().any(|l: &String| l.contains("Press Ctrl-C")) {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("dfs up printed no start-up report: {printed:?}"));
        printed.push(line);
    }
    // "  metrics     mount http://127.0.0.1:P/metrics" and one line per other process.
    let urls: Vec<(String, String)> = printed
        .iter()
        .filter_map(|l| {
            let url = l.split_whitespace().find(|w| w.starts_with("http://"))?;
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == url)?;
            Some((words[at - 1].to_owned(), url.to_owned()))
        })
        .collect();
    let names: Vec<&str> = urls.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["mount", "metaserver", "storage-1", "storage-2", "storage-3"],
        "{printed:#?}"
    );

    std::fs::write(mnt.join("f"), vec![7u8; 100_000]).unwrap();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap().len(), 100_000);
    let metrics = |url: &str, raw: bool| {
        let mut cmd = Command::new(bin("dfs"));
        cmd.arg("metrics").arg(url);
        if raw {
            cmd.arg("--raw");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "dfs metrics {url}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let table = metrics(&urls[0].1, false);
    assert!(
        ["create", "write", "flush", "read"]
            .iter()
            .all(|op| table.lines().any(|l| l.starts_with("fuse_request") && l.contains(op))),
        "mount:\n{table}"
    );
    let table = metrics(&urls[1].1, false);
    assert!(
        table.contains("CommitWrite") && table.contains("Create"),
        "metaserver:\n{table}"
    );
    let raw = metrics(&urls[1].1, true);
    assert!(
        raw.contains("dfs_metaserver_commit_batch_operations_bucket") && raw.contains("# EOF"),
        "{raw}"
    );
    let written: Vec<String> = urls[2..].iter().map(|(_, u)| metrics(u, false)).collect();
    assert!(
        written.iter().any(|t| t.contains("WritePiece")),
        "no daemon counted the piece write: {written:#?}"
    );
    stop(child, libc::SIGINT);
}
