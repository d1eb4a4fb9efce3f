//! What `close()` and `fsync()` acknowledged is kept, and a failure is reported to whoever
//! wrote: regression tests for paths where that was broken (issue 9).
//!
//! One test at a time: several kill daemons or depend on when a commit happens, and a fork by
//! another test thread (cp, dfs status) closes inherited descriptors, which is a commit.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dfs_tests::{Cluster, close, locate, write_file};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Two storage daemons, every piece on both.
fn two_daemons_two_copies() -> Cluster {
    let tweak = |c: &mut dfs_common::Config| c.metaserver.as_mut().unwrap().replicas = 2;
    Cluster::with(dfs_tests::Options {
        storage_daemons: 2,
        tweak,
        ..Default::default()
    })
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

/// Forks a child that closes its inherited copy of `file`'s descriptor (as `make > log` or a
/// shell pipeline does) and returns what that close reported.
fn close_in_forked_child(file: &fs::File) -> Result<(), i32> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: the child only calls close and _exit, both async-signal-safe.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        unsafe {
            let rc = libc::close(fd);
            let errno = *libc::__errno_location();
            libc::_exit(if rc == 0 { 0 } else { errno.clamp(1, 255) });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        errno => Err(errno),
    }
}

/// A write failure reaches every descriptor that was open for writing when it happened, at
/// its close, whoever closed first (another process, a forked child holding the same
/// descriptor); after it, nobody on the mount reads the lost bytes.
#[test]
fn a_lost_write_is_reported_to_every_writer_and_never_read_back() {
    let _serial = serial();
    let mut cluster = Cluster::start(1);
    let mnt = cluster.mount();
    let path = mnt.join("f");
    let mut p1 = fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut p1, &vec![7u8; 100 << 10]).unwrap();
    let p2 = OpenOptions::new().append(true).open(&path).unwrap();
    let reader = fs::File::open(&path).unwrap();
    cluster.kill_daemon("storage-1");
    // P2 closes first: its close commits P1's writes, which fails.
    let e = close(p2).expect_err("close after the only daemon died");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(close(reader).is_ok(), "a reader did not write anything");
    // A child closing its inherited copy hears of it, and so does P1 after it.
    assert_eq!(
        close_in_forked_child(&p1),
        Err(libc::EIO),
        "the child's close of its inherited descriptor reports the failure"
    );
    let e = close(p1).expect_err("P1's close must report its lost write");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // The file is as last committed (empty): no size or byte of the lost write is seen.
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(fs::read(&path).unwrap(), b"");
    // A descriptor opened after the failure was reported does not hear of it.
    cluster.start_daemon("storage-1");
    cluster.wait_all_up();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"new", 0).unwrap();
    close(f).expect("a new writer after the failure");
    assert_eq!(fs::read(&path).unwrap(), b"new");
}

/// fsync reports the failure to its descriptor once; each descriptor hears it.
#[test]
fn fsync_reports_a_lost_write_to_each_descriptor_once() {
    let _serial = serial();
    let mut cluster = Cluster::start(1);
    let mnt = cluster.mount();
    let path = mnt.join("g");
    let a = fs::File::create(&path).unwrap();
    a.write_all_at(&[1u8; 5000], 0).unwrap();
    let b = OpenOptions::new().write(true).open(&path).unwrap();
    cluster.kill_daemon("storage-1");
    assert!(b.sync_all().is_err(), "b was open for writing when the write was lost");
    assert!(b.sync_all().is_ok(), "reported once per descriptor");
    assert!(a.sync_all().is_err(), "a hears of it too, although b's fsync found it");
    assert!(a.sync_all().is_ok());
}

fn flock(file: &fs::File, op: i32) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(file.as_raw_fd(), op) }, 0, "flock");
}

/// Under a lock, each holder writes on top of what the previous holder wrote: the piece a
/// create sets aside for a file's first chunk (with nothing to copy) is not used once another
/// mount has written that chunk.
#[test]
fn a_lock_holder_writes_on_top_of_what_the_previous_holder_wrote() {
    let _serial = serial();
    let mut cluster = Cluster::start(2);
    let (a, b) = (cluster.mount(), cluster.mount());
    let on_a = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(a.join("shared"))
        .unwrap();
    {
        let on_b = OpenOptions::new().write(true).open(b.join("shared")).unwrap();
        flock(&on_b, libc::LOCK_EX);
        on_b.write_all_at(b"BBBB", 0).unwrap();
        flock(&on_b, libc::LOCK_UN);
        close(on_b).unwrap();
    }
    flock(&on_a, libc::LOCK_EX);
    on_a.write_all_at(b"A", 8).unwrap();
    flock(&on_a, libc::LOCK_UN);
    close(on_a).unwrap();
    assert_eq!(fs::read(b.join("shared")).unwrap(), b"BBBB\0\0\0\0A");
    assert_eq!(fs::read(a.join("shared")).unwrap(), b"BBBB\0\0\0\0A");
}

/// Piece files stored by the daemons in `names`.
fn stored(cluster: &Cluster, names: &[&str]) -> usize {
    names.iter().map(|n| cluster.stored_pieces(n)).sum()
}

/// A daemon comes back with an empty disk (replaced): the copies it was recorded with are
/// found missing and re-made, and `dfs status` never calls the cluster healthy meanwhile.
#[test]
fn copies_lost_with_a_wiped_disk_are_found_and_remade_and_status_tells_the_truth() {
    let _serial = serial();
    let tweak = |c: &mut dfs_common::Config| {
        let m = c.metaserver.as_mut().unwrap();
        m.replicas = 2;
        m.orphan_piece_grace_secs = 10;
    };
    let mut cluster = Cluster::with(dfs_tests::Options {
        storage_daemons: 2,
        tweak,
        ..Default::default()
    });
    let mnt = cluster.mount();
    let names = ["storage-1", "storage-2"];
    for i in 0..200 {
        write_file(
            &mnt.join(format!("f{i}")),
            format!("file number {i}").repeat(50).as_bytes(),
        )
        .unwrap();
    }
    dfs_tests::wait_until("400 copies stored", Duration::from_secs(30), || {
        stored(&cluster, &names) == 400 && cluster.status().redundancy.copies == 400
    });
    cluster.unmount(&mnt);
    for n in names {
        cluster.kill_daemon(n);
    }
    cluster.kill_metaserver();
    fs::remove_dir_all(cluster.data_dir("storage-2").join("pieces")).unwrap();
    cluster.start_metaserver();
    for n in names {
        cluster.start_daemon(n);
    }
    let started = Instant::now();
    let mut said_healthy_while_missing = Vec::new();
    dfs_tests::wait_until("the lost copies re-made", Duration::from_secs(90), || {
        let Some(r) = cluster.try_status() else { return false };
        let on_disk = stored(&cluster, &names);
        let d = &r.redundancy;
        let healthy = d.lost == 0 && d.unavailable == 0 && d.under_replicated == 0 && d.unverified_daemons == 0;
        if healthy && d.scanned_ms_ago < 5000 && on_disk < 400 {
            said_healthy_while_missing.push(format!(
                "{:?}: healthy, {} copies recorded, {on_disk} stored",
                started.elapsed(),
                d.copies
            ));
        }
        healthy && d.copies == 400 && on_disk == 400
    });
    assert!(said_healthy_while_missing.is_empty(), "{said_healthy_while_missing:#?}");
    let mnt = cluster.mount();
    dfs_tests::drop_caches();
    for i in 0..200 {
        assert_eq!(
            fs::read(mnt.join(format!("f{i}"))).unwrap(),
            format!("file number {i}").repeat(50).as_bytes()
        );
    }
}

/// A copy deleted by hand while everything runs is reported by the first read that misses
/// it (the read itself is served by the other copy), and re-made.
#[test]
fn a_read_that_finds_a_copy_missing_reports_it_and_the_copy_is_remade() {
    let _serial = serial();
    let mut cluster = two_daemons_two_copies();
    let mnt = cluster.mount();
    let path = mnt.join("f");
    write_file(&path, b"precious").unwrap();
    let loc = locate(&cluster, std::slice::from_ref(&path))[0].chunks[0].clone();
    assert_eq!(loc.nodes.len(), 2);
    // Reads start at copy `piece % copies`: take that one away.
    let first = loc.nodes[(loc.piece % 2) as usize].name.clone();
    let file = cluster.piece_path(&first, loc.piece);
    fs::remove_file(&file).unwrap();
    dfs_tests::drop_caches();
    assert_eq!(fs::read(&path).unwrap(), b"precious");
    dfs_tests::wait_until("the missing copy re-made", Duration::from_secs(30), || file.exists());
    dfs_tests::wait_until("two copies recorded", Duration::from_secs(10), || {
        let d = cluster.status().redundancy;
        d.copies == 2 && d.under_replicated == 0
    });
    assert!(
        cluster.logs().contains("lacks"),
        "the metaserver says which daemon lacked a copy"
    );
}

/// Writes made under a lock are committed only while the lock is held: a mount that was
/// frozen past its session timeout lost its lock to another mount, which wrote; the frozen
/// mount's late commit is refused (its close reports it) instead of overwriting.
#[test]
fn a_late_commit_after_the_lock_was_lost_is_refused() {
    let _serial = serial();
    let tweak = |c: &mut dfs_common::Config| c.metaserver.as_mut().unwrap().session_timeout_ms = 2000;
    let mut cluster = Cluster::with(dfs_tests::Options {
        storage_daemons: 1,
        tweak,
        ..Default::default()
    });
    let (a, b) = (cluster.mount(), cluster.mount());
    write_file(&a.join("db"), b"original").unwrap();
    let on_a = OpenOptions::new().write(true).open(a.join("db")).unwrap();
    flock(&on_a, libc::LOCK_EX);
    on_a.write_all_at(b"AAAAAAAA", 0).unwrap();
    // Mount A freezes (a long pause, a partition) with the write not committed.
    cluster.signal_mount(&a, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(4));
    // Its session expired: B gets the lock and writes.
    let on_b = OpenOptions::new().write(true).open(b.join("db")).unwrap();
    flock(&on_b, libc::LOCK_EX);
    on_b.write_all_at(b"BBBBBBBB", 0).unwrap();
    flock(&on_b, libc::LOCK_UN);
    close(on_b).unwrap();
    cluster.signal_mount(&a, libc::SIGCONT);
    let e = close(on_a).expect_err("A's writes were made under a lock it lost");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(fs::read(b.join("db")).unwrap(), b"BBBBBBBB");
    assert!(cluster.logs().contains("lock these writes were made under was lost"));
}

fn dfs(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    std::process::Command::new(dfs_tests::bin("dfs"))
        .args(args)
        .arg("--config")
        .arg(cluster.config_path())
        .output()
        .unwrap()
}

/// A daemon gone for good is forgotten with `dfs node forget`: its queued deletions go with
/// it (they were kept forever before), and so do the copies it was recorded with, which the
/// repair re-makes. Refused while it is up.
#[test]
fn a_daemon_removed_for_good_takes_its_queued_deletions_with_it() {
    let _serial = serial();
    let tweak = |c: &mut dfs_common::Config| c.metaserver.as_mut().unwrap().replicas = 2;
    let mut cluster = Cluster::with(dfs_tests::Options {
        storage_daemons: 3,
        tweak,
        ..Default::default()
    });
    let mnt = cluster.mount();
    for i in 0..30 {
        write_file(&mnt.join(format!("f{i}")), format!("version 1 of {i}").as_bytes()).unwrap();
    }
    let refused = dfs(&cluster, &["node", "forget", "storage-3"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is up"),
        "{refused:?}"
    );
    cluster.kill_daemon("storage-3");
    cluster.wait_daemon_state("storage-3", false, Duration::from_secs(15));
    // Rewrites and deletions while it is away queue deletions for it.
    for i in 0..30 {
        if i % 2 == 0 {
            fs::remove_file(mnt.join(format!("f{i}"))).unwrap();
        } else {
            write_file(&mnt.join(format!("f{i}")), format!("version 2 of {i}").as_bytes()).unwrap();
        }
    }
    let queued = |cluster: &Cluster| {
        cluster
            .status()
            .nodes
            .iter()
            .find(|n| n.node.name == "storage-3")
            .map(|n| n.pending_deletes)
    };
    assert!(queued(&cluster).unwrap() > 0);
    let out = dfs(&cluster, &["node", "forget", "storage-3"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("forgotten"), "{out:?}");
    assert_eq!(queued(&cluster), None, "storage-3 is gone from the cluster");
    // The other daemons carry out theirs; storage-3's would have stayed queued for ever.
    dfs_tests::wait_until("no deletion left queued", Duration::from_secs(15), || {
        cluster.status().pending_deletes == 0
    });
    dfs_tests::wait_until("every piece at two copies again", Duration::from_secs(60), || {
        let d = cluster.status().redundancy;
        d.under_replicated == 0 && d.copies == d.pieces * 2
    });
    for i in (1..30).step_by(2) {
        assert_eq!(
            fs::read(mnt.join(format!("f{i}"))).unwrap(),
            format!("version 2 of {i}").as_bytes()
        );
    }
}

/// A new file's chunk map is committed while its copies become durable. A copy that fails
/// then (its daemon killed between the writes and the close) is withdrawn before the close
/// returns: the close succeeds on the other copy, the chunk map names only that one (not a
/// copy nobody holds), and the missing copy is re-made once the daemon is back.
#[test]
fn a_copy_lost_while_its_commit_ran_ahead_is_withdrawn_and_remade() {
    let _serial = serial();
    let mut cluster = two_daemons_two_copies();
    let mnt = cluster.mount();
    let path = mnt.join("f");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut f = fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut f, &data).unwrap();
    cluster.kill_daemon("storage-2");
    close(f).expect("one durable copy is enough for the close");
    let loc = locate(&cluster, std::slice::from_ref(&path))[0].chunks[0].clone();
    let holders: Vec<&str> = loc.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(holders, ["storage-1"], "the failed copy was withdrawn at the close");
    dfs_tests::drop_caches();
    assert_eq!(fs::read(&path).unwrap(), data);
    cluster.start_daemon("storage-2");
    cluster.wait_all_up();
    dfs_tests::wait_until("the withdrawn copy re-made", Duration::from_secs(60), || {
        let d = cluster.status().redundancy;
        d.copies == 2 && d.under_replicated == 0
    });
    assert_eq!(fs::read(&path).unwrap(), data);
}

/// A close that fails leaves the file as last committed, all of it: a long write into a new
/// file whose earlier pieces were already durable (settled while later chunks streamed) and
/// whose last ones are lost with their daemon is undone as a whole, the durable pieces
/// committed with it included; if every piece happened to survive, the close succeeds.
#[test]
fn a_failed_close_of_a_new_file_commits_none_of_its_pieces() {
    let _serial = serial();
    let mut cluster = Cluster::with(dfs_tests::Options {
        storage_daemons: 2,
        ..Default::default()
    });
    let mnt = cluster.mount();
    let path = mnt.join("long");
    let data: Vec<u8> = (0..(14u32 << 23)).map(|i| (i % 253) as u8).collect();
    let mut f = fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut f, &data).unwrap();
    cluster.kill_daemon("storage-2");
    match close(f) {
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
            assert_eq!(
                fs::metadata(&path).unwrap().len(),
                0,
                "nothing of the failed write stays"
            );
            let chunks = &locate(&cluster, std::slice::from_ref(&path))[0].chunks;
            assert!(chunks.is_empty(), "no piece stays referenced past the end: {chunks:?}");
            dfs_tests::drop_caches();
            assert_eq!(fs::read(&path).unwrap(), b"");
        }
        Ok(()) => {
            println!("every piece was on storage-1: the close succeeded");
            dfs_tests::drop_caches();
            assert!(fs::read(&path).unwrap() == data);
        }
    }
}
