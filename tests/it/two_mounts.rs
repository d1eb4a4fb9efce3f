//! Two dfs-mount processes on one cluster: close-to-open consistency, metadata visibility
//! within the cache timeout, page-cache reuse, and locks enforced between the mounts.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dfs_tests::{Cluster, Options, run, wait_until};

/// The default attribute/entry cache timeout (1 s) plus slack.
const VISIBLE_WITHIN: Duration = Duration::from_secs(3);

fn lock(file: &fs::File, kind: i32, start: i64, len: i64, wait: bool) -> Result<(), i32> {
    let fl = libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    let cmd = if wait { libc::F_SETLKW } else { libc::F_SETLK };
    // SAFETY: valid descriptor and flock struct.
    match unsafe { libc::fcntl(file.as_raw_fd(), cmd, &fl) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap()),
    }
}

#[test]
fn close_to_open_and_metadata_visibility() {
    let mut cluster = Cluster::start(2);
    let (a, b) = (cluster.mount(), cluster.mount());
    // After close on A, an open on B sees the new content and size.
    fs::write(a.join("doc"), "first version").unwrap();
    assert_eq!(fs::read_to_string(b.join("doc")).unwrap(), "first version");
    fs::write(a.join("doc"), "second, longer version").unwrap();
    assert_eq!(fs::read_to_string(b.join("doc")).unwrap(), "second, longer version");
    let mut f = OpenOptions::new().append(true).open(a.join("doc")).unwrap();
    f.write_all(b" + appended").unwrap();
    drop(f);
    assert_eq!(
        fs::read_to_string(b.join("doc")).unwrap(),
        "second, longer version + appended"
    );
    // Metadata changes on A show on B within the cache timeout.
    let visible = |what: &str, cond: &dyn Fn() -> bool| {
        let t = Instant::now();
        wait_until(what, VISIBLE_WITHIN, cond);
        println!("{what}: {:?}", t.elapsed());
    };
    assert!(!b.join("new").exists());
    fs::write(a.join("new"), "x").unwrap();
    visible("create seen on B", &|| b.join("new").exists());
    fs::set_permissions(a.join("new"), fs::Permissions::from_mode(0o600)).unwrap();
    visible("chmod seen on B", &|| {
        fs::metadata(b.join("new")).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o600)
    });
    fs::rename(a.join("new"), a.join("renamed")).unwrap();
    visible("rename seen on B", &|| {
        !b.join("new").exists() && b.join("renamed").exists()
    });
    fs::remove_file(a.join("renamed")).unwrap();
    visible("unlink seen on B", &|| !b.join("renamed").exists());
    fs::create_dir(a.join("dir")).unwrap();
    visible("mkdir seen on B", &|| b.join("dir").is_dir());
}

#[test]
fn page_cache_is_kept_while_unchanged_and_dropped_when_changed() {
    let mut cluster = Cluster::start(2);
    let (a, b) = (cluster.mount(), cluster.mount());
    let body = dfs_tests::data::bytes(3 << 20, 1);
    fs::write(a.join("written_on_a"), &body).unwrap();
    fs::write(a.join("read_on_b"), &body).unwrap();
    fs::write(a.join("changed_on_a"), vec![1u8; 1 << 20]).unwrap();
    assert_eq!(fs::read(b.join("read_on_b")).unwrap(), body);
    assert_eq!(fs::read(b.join("changed_on_a")).unwrap(), vec![1u8; 1 << 20]);
    // A rewrites a file B has cached (same size): B's next open sees the new bytes.
    std::thread::sleep(Duration::from_millis(20));
    fs::write(a.join("changed_on_a"), vec![2u8; 1 << 20]).unwrap();
    assert_eq!(fs::read(b.join("changed_on_a")).unwrap(), vec![2u8; 1 << 20]);
    // With every storage daemon gone, what each mount has cached and is unchanged is still
    // readable (so it came from the page cache, not the daemons).
    for name in cluster.daemon_names() {
        cluster.kill_daemon(&name);
    }
    assert_eq!(
        fs::read(a.join("written_on_a")).unwrap(),
        body,
        "A reads what it wrote from cache"
    );
    assert_eq!(
        fs::read(b.join("read_on_b")).unwrap(),
        body,
        "B reopens an unchanged file from cache"
    );
    assert!(
        fs::read(b.join("written_on_a")).is_err(),
        "B never read it: it needs the daemons"
    );
}

#[test]
fn fcntl_and_flock_locks_hold_across_mounts() {
    let mut cluster = Cluster::start(2);
    let (a, b) = (cluster.mount(), cluster.mount());
    fs::write(a.join("locked"), "data").unwrap();
    let fa = OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.join("locked"))
        .unwrap();
    let fb = OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.join("locked"))
        .unwrap();
    // Byte ranges: a write lock on A blocks B on overlapping bytes only.
    lock(&fa, libc::F_WRLCK, 0, 10, false).unwrap();
    assert_eq!(lock(&fb, libc::F_RDLCK, 5, 1, false), Err(libc::EAGAIN));
    lock(&fb, libc::F_WRLCK, 10, 10, false).unwrap();
    // F_GETLK from B reports A's lock.
    let mut probe = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 5,
        l_pid: 0,
    };
    // SAFETY: valid descriptor and flock struct.
    assert_eq!(unsafe { libc::fcntl(fb.as_raw_fd(), libc::F_GETLK, &mut probe) }, 0);
    assert_eq!(
        (probe.l_type as i32, probe.l_start, probe.l_len),
        (libc::F_WRLCK, 0, 10)
    );
    // F_SETLKW on B waits until A unlocks.
    let waiter = {
        let fb = fb.try_clone().unwrap();
        std::thread::spawn(move || {
            let t = Instant::now();
            lock(&fb, libc::F_WRLCK, 0, 10, true).unwrap();
            // Returned, not dropped: closing any descriptor of the file would drop the
            // process' locks on it.
            (t.elapsed(), fb)
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    lock(&fa, libc::F_UNLCK, 0, 10, false).unwrap();
    let (waited, fb_clone) = waiter.join().unwrap();
    assert!(waited >= Duration::from_millis(500), "waited only {waited:?}");
    // Closing the file releases the process' locks.
    assert_eq!(lock(&fa, libc::F_WRLCK, 0, 1, false), Err(libc::EAGAIN));
    drop(fb);
    drop(fb_clone);
    lock(&fa, libc::F_WRLCK, 0, 1, false).unwrap();
    drop(fa);
    // flock(1) between the mounts; a holder that exits releases its lock.
    let a_file = a.join("locked").display().to_string();
    let b_file = b.join("locked").display().to_string();
    let mut holder = Command::new("flock")
        .args(["-x", &a_file, "-c", "sleep 30"])
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    wait_until("A's flock", Duration::from_secs(5), || {
        !Command::new("flock")
            .args(["-n", &b_file, "true"])
            .status()
            .unwrap()
            .success()
    });
    assert!(
        !Command::new("flock")
            .args(["-n", "-s", &b_file, "true"])
            .status()
            .unwrap()
            .success()
    );
    // SAFETY: signalling our own child's process group (flock and its sleep).
    unsafe { libc::kill(-(holder.id() as i32), libc::SIGKILL) };
    holder.wait().unwrap();
    wait_until("the killed holder's flock to go", Duration::from_secs(5), || {
        Command::new("flock")
            .args(["-n", &b_file, "true"])
            .status()
            .unwrap()
            .success()
    });
}

#[test]
fn locks_of_a_dead_mount_expire_with_its_session() {
    let mut cluster = Cluster::with(Options {
        storage_daemons: 1,
        tweak: |c| c.metaserver.as_mut().unwrap().session_timeout_ms = 3000,
        ..Options::default()
    });
    let (a, b) = (cluster.mount(), cluster.mount());
    fs::write(a.join("lease"), "").unwrap();
    let held = OpenOptions::new().write(true).open(a.join("lease")).unwrap();
    lock(&held, libc::F_WRLCK, 0, 0, false).unwrap();
    let fb = OpenOptions::new().write(true).open(b.join("lease")).unwrap();
    assert_eq!(lock(&fb, libc::F_WRLCK, 0, 0, false), Err(libc::EAGAIN));
    // The holder's mount dies without a word; its session lapses, and the lock with it.
    std::mem::forget(held);
    cluster.kill_mount(&a);
    let t = Instant::now();
    wait_until("the dead mount's lock to expire", Duration::from_secs(20), || {
        lock(&fb, libc::F_WRLCK, 0, 0, false).is_ok()
    });
    println!("lock free {:?} after the mount died", t.elapsed());
    assert!(
        cluster.logs().contains("expired"),
        "the metaserver says the session expired"
    );
}

#[test]
fn sqlite_with_a_writer_on_each_mount_stays_intact() {
    let mut cluster = Cluster::start(2);
    let (a, b) = (cluster.mount(), cluster.mount());
    let db_a = a.join("shared.db");
    let db_b = b.join("shared.db");
    run(Command::new("sqlite3")
        .arg(&db_a)
        .arg("create table t(id integer primary key, who text, n int); insert into t(who, n) values('init', 0);"));
    let writer = |db: &Path, who: &'static str| {
        let db = db.to_owned();
        std::thread::spawn(move || {
            for i in 0..100 {
                let sql = format!(
                    "begin immediate; insert into t(who, n) values('{who}', {i}); update t set n = n + 1 where id = 1; commit;"
                );
                run(Command::new("sqlite3")
                    // `.log stderr`: on failure, sqlite says which system call failed and how.
                    .args(["-cmd", ".timeout 30000", "-cmd", ".log stderr"])
                    .arg(&db)
                    .arg(sql));
            }
        })
    };
    let (wa, wb) = (writer(&db_a, "a"), writer(&db_b, "b"));
    wa.join().unwrap();
    wb.join().unwrap();
    for db in [&db_a, &db_b] {
        let out = run(Command::new("sqlite3").arg(db).arg(
            "pragma integrity_check; select count(*) from t where who = 'a'; select count(*) from t where who = 'b'; select n from t where id = 1;",
        ));
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "ok\n100\n100\n200\n");
    }
}

/// A name another mount removed is gone for `open()`, even while this mount's kernel still
/// holds the entry (within the entry cache timeout) and the inode lives on because a process
/// there keeps it open. Before, the open reached that unlinked inode: SQLite on the second
/// mount took another mount's deleted journal for a hot one and rolled committed transactions
/// back, or wrote its own journal into the deleted file and then failed to delete it (EIO).
#[test]
fn open_through_a_cached_entry_does_not_reach_a_file_removed_elsewhere() {
    let mut cluster = Cluster::with(Options {
        storage_daemons: 1,
        // Long enough that the kernel on B answers from its cache throughout.
        tweak: |c| {
            if let Some(client) = c.client.as_mut() {
                client.entry_timeout_ms = 60_000;
                client.attr_timeout_ms = 60_000;
            }
        },
        ..Options::default()
    });
    let (a, b) = (cluster.mount(), cluster.mount());
    fs::write(a.join("journal"), "old journal").unwrap();
    // B looks the name up (and caches the entry).
    assert_eq!(fs::read_to_string(b.join("journal")).unwrap(), "old journal");
    // A keeps the file open and removes it: the inode lives on, unlinked.
    let held = fs::File::open(a.join("journal")).unwrap();
    fs::remove_file(a.join("journal")).unwrap();
    for (i, how) in ["read-only", "read-write", "create"].iter().enumerate() {
        let r = match i {
            0 => fs::File::open(b.join("journal")),
            1 => OpenOptions::new().read(true).write(true).open(b.join("journal")),
            _ => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(b.join("journal")),
        };
        match (i, r) {
            (0 | 1, Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{how} open: {e}"),
            (0 | 1, Ok(_)) => panic!("{how} open on B reached the file A removed"),
            (_, r) => {
                // Creating makes a new, empty file under the name, visible to A as well.
                let mut f = r.unwrap_or_else(|e| panic!("{how} open: {e}"));
                f.write_all(b"new journal").unwrap();
                dfs_tests::close(f).unwrap();
            }
        }
    }
    assert_eq!(fs::read_to_string(a.join("journal")).unwrap(), "new journal");
    assert_eq!(fs::read_to_string(b.join("journal")).unwrap(), "new journal");
    drop(held);
}

/// `mmap(MAP_SHARED)` of `file` for reading and writing: the errno if refused.
fn map_shared(file: &fs::File, len: usize, prot: i32) -> Result<(), i32> {
    // SAFETY: a fresh mapping of an open file, unmapped before returning.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0);
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        libc::munmap(p, len);
    }
    Ok(())
}

/// Pages written through a shared mapping reach the mount whenever the kernel writes them
/// back, a whole page at a time: a mapping on each of two mounts would write each one's stale
/// pages over the other's. (SQLite in WAL mode with a reader on another machine lost a
/// committed transaction so: the reader's stale `-shm` index, written back, made the writer
/// reuse WAL frames.) A mount opening for writing a file another mount has open gets a
/// descriptor without page cache, whose shared mapping is refused.
#[test]
fn a_shared_writable_mapping_exists_on_one_mount_at_a_time() {
    let mut cluster = Cluster::start(2);
    let (a, b) = (cluster.mount(), cluster.mount());
    fs::write(a.join("shm"), vec![7u8; 8192]).unwrap();
    let rw = |dir: &Path| OpenOptions::new().read(true).write(true).open(dir.join("shm")).unwrap();
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let on_a = rw(&a);
    assert_eq!(map_shared(&on_a, 8192, prot), Ok(()), "the first mount maps it");
    let second = rw(&a);
    assert_eq!(
        map_shared(&second, 8192, prot),
        Ok(()),
        "so does a second open on that mount"
    );
    drop(second);
    let on_b = rw(&b);
    assert_eq!(
        map_shared(&on_b, 8192, prot),
        Err(libc::ENODEV),
        "the other mount is refused"
    );
    // Reads and writes through that descriptor still work, uncached.
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 4];
    on_b.read_exact_at(&mut buf, 100).unwrap();
    assert_eq!(buf, [7; 4]);
    on_b.write_all_at(b"from b", 0).unwrap();
    on_b.sync_all().unwrap();
    drop(on_b);
    // Read-only opens keep the page cache: their mappings cannot write anything back.
    let read_only = fs::File::open(b.join("shm")).unwrap();
    assert_eq!(map_shared(&read_only, 8192, libc::PROT_READ), Ok(()));
    drop(read_only);
    // Once the first mount has closed it (its release reaches the metaserver moments after
    // the close), the other one maps it.
    drop(on_a);
    wait_until("the file maps on the other mount", Duration::from_secs(5), || {
        map_shared(&rw(&b), 8192, prot).is_ok()
    });
    assert_eq!(&fs::read(b.join("shm")).unwrap()[..6], b"from b");
}

/// A mount answers lookups of names absent from a directory it made itself without asking the
/// metaserver (`tar -x`), but only while nobody else changed the directory, and only within
/// the entry timeout: a name another mount creates there is seen within it, an exclusive
/// create of that name fails at once, and the next change this mount makes there shows the
/// other mount's change (its knowledge is dropped, the name found immediately).
#[test]
fn names_created_elsewhere_in_a_directory_this_mount_made_are_seen() {
    let mut cluster = Cluster::start(1);
    let (a, b) = (cluster.mount(), cluster.mount());
    fs::create_dir(a.join("d")).unwrap();
    fs::write(a.join("d/mine"), "a").unwrap();
    // B sees the directory (a lookup of its own), then creates a name in it.
    wait_until("d seen on B", VISIBLE_WITHIN, || b.join("d").exists());
    fs::write(b.join("d/theirs"), "b").unwrap();
    let exclusive = OpenOptions::new().write(true).create_new(true).open(a.join("d/theirs"));
    assert_eq!(
        exclusive.map(drop).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::AlreadyExists),
        "the metaserver decides, whatever A believed"
    );
    let t = Instant::now();
    wait_until("B's create seen on A", VISIBLE_WITHIN, || a.join("d/theirs").exists());
    println!("seen after {:?}", t.elapsed());
    // Another change of B's, then one of A's: A's reply shows two changes, not one.
    fs::write(b.join("d/later"), "b").unwrap();
    fs::write(a.join("d/mine2"), "a").unwrap();
    assert!(
        a.join("d/later").exists(),
        "A learned at its own change that B changed d"
    );
    assert_eq!(fs::read_to_string(a.join("d/later")).unwrap(), "b");
}
