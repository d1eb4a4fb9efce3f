//! Failures turn into clear errors within seconds, never hangs, and the rest keeps working.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use dfs_tests::{Cluster, data, locate, timed, wait_until};

/// How long any failing operation may take before it reports its error.
const LIMIT: Duration = Duration::from_secs(10);

/// These tests measure seconds: run them one at a time, not competing for the CPU.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Creates, writes and closes a file; the error of whichever step failed.
fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    Ok(())
}

#[test]
fn a_dead_storage_daemon_fails_only_its_own_reads() {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    let mnt = cluster.mount();
    let files: Vec<_> = (0..24).map(|i| mnt.join(format!("f{i:02}"))).collect();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(f, data::bytes(10_000 + i, i as u64)).unwrap();
    }
    let victim = "storage-2";
    let located = locate(&cluster, &files);
    let (lost, kept): (Vec<_>, Vec<_>) = located.iter().partition(|l| l.holders() == [victim]);
    assert!(!lost.is_empty() && !kept.is_empty(), "placement: {located:?}");

    cluster.kill_daemon(victim);
    // Reads of its files fail with EIO, each within the limit...
    for l in lost.iter().take(2) {
        let (r, took) = timed(|| read_all(&l.path));
        let err = r.expect_err("read of a file on a dead daemon must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{}: {err}", l.path.display());
        assert!(took < LIMIT, "{} took {took:?} to fail", l.path.display());
    }
    // ...while every other file still reads back intact.
    for l in &kept {
        let i: usize = l.path.file_name().unwrap().to_str().unwrap()[1..].parse().unwrap();
        let (r, took) = timed(|| read_all(&l.path));
        assert_eq!(r.unwrap(), data::bytes(10_000 + i, i as u64), "{}", l.path.display());
        assert!(took < LIMIT);
    }
    // Once the metaserver has noticed, reads fail at once and the log names the daemon.
    cluster.wait_daemon_state(victim, false, LIMIT);
    let (r, took) = timed(|| read_all(&lost[0].path));
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        cluster.logs().contains(&format!("storage daemon {victim}")),
        "no log line names {victim}"
    );

    // New files keep working, placed on the live daemons.
    let new: Vec<_> = (0..12).map(|i| mnt.join(format!("new{i:02}"))).collect();
    for (i, f) in new.iter().enumerate() {
        write_file(f, &data::bytes(5000, 100 + i as u64)).unwrap();
        assert_eq!(read_all(f).unwrap(), data::bytes(5000, 100 + i as u64));
    }
    for l in locate(&cluster, &new) {
        assert!(
            !l.holders().contains(&victim.to_string()),
            "{} placed on the dead daemon",
            l.path.display()
        );
    }

    // Deleting a file whose daemon is down works; the daemon catches up when it returns.
    let doomed = lost.last().unwrap();
    std::fs::remove_file(&doomed.path).unwrap();
    // It held one piece per file it held, none written since: one fewer once it catches up.
    let expected_pieces = lost.len() as u64 - 1;

    // The daemon comes back: its files read again, and the deleted one's piece goes away.
    cluster.start_daemon(victim);
    cluster.wait_daemon_state(victim, true, LIMIT);
    let l = &lost[0];
    let i: usize = l.path.file_name().unwrap().to_str().unwrap()[1..].parse().unwrap();
    assert_eq!(read_all(&l.path).unwrap(), data::bytes(10_000 + i, i as u64));
    wait_until(
        "the returning daemon to delete what was removed meanwhile",
        LIMIT,
        || {
            let r = cluster.status();
            let n = r.nodes.iter().find(|n| n.node.name == victim).unwrap();
            r.pending_deletes == 0 && n.usage.pieces == expected_pieces
        },
    );
}

#[test]
fn no_storage_daemon_means_enospc_within_seconds() {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    let mnt = cluster.mount();
    write_file(&mnt.join("before"), b"data").unwrap();
    let killed = Instant::now();
    for name in cluster.daemon_names() {
        cluster.kill_daemon(&name);
    }
    let body = vec![1u8; 1 << 20];
    let mut attempt = 0;
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = write_file(&mnt.join(format!("after{attempt}")), &body);
        let took = started.elapsed();
        assert!(took < LIMIT, "attempt {attempt} took {took:?}");
        match result {
            Ok(()) => panic!("attempt {attempt}: a write acknowledged with no storage daemon alive"),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "attempt {attempt}: {e}"),
        }
        assert!(
            killed.elapsed() < LIMIT,
            "no ENOSPC within {LIMIT:?} of the last daemon dying"
        );
    }
    assert!(
        killed.elapsed() < LIMIT,
        "ENOSPC came {:?} after the daemons died",
        killed.elapsed()
    );
    // Metadata still works, and the log says why writes fail.
    std::fs::create_dir(mnt.join("dir")).unwrap();
    assert!(cluster.logs().contains("no storage daemon available"));
}

#[test]
fn a_stopped_metaserver_gives_errors_not_hangs_and_the_mount_recovers() {
    let _serial = serial();
    let mut cluster = Cluster::start(2);
    let mnt = cluster.mount();
    std::fs::write(mnt.join("a"), b"first").unwrap();

    // Frozen: stat of something not cached fails within the limit.
    cluster.signal_metaserver(libc::SIGSTOP);
    let (r, took) = timed(|| std::fs::metadata(mnt.join("not-cached")));
    cluster.signal_metaserver(libc::SIGCONT);
    let err = r.expect_err("stat with a frozen metaserver must fail");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::ETIMEDOUT)),
        "{err}"
    );
    assert!(took < LIMIT, "stat took {took:?}");
    wait_until("the mount to work again", LIMIT, || {
        std::fs::read(mnt.join("a")).is_ok()
    });

    // Killed: the same; restarted on the same address, the same mount works again.
    cluster.kill_metaserver();
    let (r, took) = timed(|| std::fs::metadata(mnt.join("also-not-cached")));
    assert!(r.is_err());
    assert!(took < LIMIT, "stat took {took:?}");
    cluster.start_metaserver();
    cluster.wait_all_up();
    wait_until("the mount to work again", Duration::from_secs(20), || {
        std::fs::metadata(mnt.join("a")).is_ok()
    });
    assert_eq!(std::fs::read(mnt.join("a")).unwrap(), b"first");
    write_file(&mnt.join("b"), b"second").unwrap();
    assert_eq!(std::fs::read(mnt.join("b")).unwrap(), b"second");
}
