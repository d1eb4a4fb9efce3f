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
