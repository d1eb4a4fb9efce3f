//! A directory with 100,000 entries: listed in pages, looked up quickly, without the
//! metaserver's memory growing with it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use dfs_tests::{Cluster, run};

const ENTRIES: usize = 100_000;
const THREADS: usize = 16;

/// Resident memory (KiB) of the metaserver serving the cluster in `dir`.
fn metaserver_rss_kib(dir: &Path) -> u64 {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("dfs-metaserver") && cmdline.contains(&*dir.to_string_lossy()) {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            return line.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
    }
    panic!("no metaserver process for {}", dir.display());
}

#[test]
fn a_directory_of_100k_entries_streams_and_stays_fast() {
    let mut cluster = Cluster::start(1);
    let mnt = cluster.mount();
    let dir = mnt.join("big");
    std::fs::create_dir(&dir).unwrap();
    let rss_before = metaserver_rss_kib(cluster.dir());
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let dir = &dir;
            s.spawn(move || {
                for i in (t..ENTRIES).step_by(THREADS) {
                    let path = CString::new(dir.join(format!("entry-{i:06}")).as_os_str().as_bytes()).unwrap();
                    // SAFETY: valid path.
                    let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFREG | 0o644, 0) };
                    assert_eq!(rc, 0, "mknod entry-{i}: {}", std::io::Error::last_os_error());
                }
            });
        }
    });
    println!("created {ENTRIES} entries in {:?}", started.elapsed());
    // ls streams the listing (readdir pages), every name present once.
    let started = Instant::now();
    let out = run(Command::new("ls").arg("-f").arg(&dir));
    let names = String::from_utf8(out.stdout).unwrap();
    assert_eq!(names.lines().count(), ENTRIES + 2, "plus . and ..");
    println!("ls -f listed them in {:?}", started.elapsed());
    let started = Instant::now();
    let long = run(Command::new("ls").arg("-l").arg(&dir));
    assert_eq!(String::from_utf8_lossy(&long.stdout).lines().count(), ENTRIES + 1);
    println!("ls -l listed them in {:?}", started.elapsed());
    // Lookups of names never seen by this mount stay cheap in a huge directory.
    let other = cluster.mount();
    let started = Instant::now();
    for i in (0..ENTRIES).step_by(ENTRIES / 1000) {
        assert!(other.join("big").join(format!("entry-{i:06}")).exists());
    }
    println!("1000 cold lookups: {:?} each", started.elapsed() / 1000);
    let rss_after = metaserver_rss_kib(cluster.dir());
    println!("metaserver resident memory: {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 256 * 1024,
        "the metaserver grew from {rss_before} KiB to {rss_after} KiB"
    );
}
