//! Redundancy, healing, balance and crash recovery, with real processes and a real mount:
//! the fault tests of issue 4. They run one at a time (each kills or freezes processes and
//! waits on the cluster's own timers).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dfs_common::Config;
use dfs_proto::meta::ClusterReport;
use dfs_tests::{Cluster, Options, bin, cmp, drop_caches, locate, run, wait_until, write_file};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fast timers so a test sees a daemon declared dead, repaired and scanned within seconds.
fn fast(config: &mut Config, replicas: u8) {
    let m = config.metaserver.as_mut().expect("metaserver");
    m.replicas = replicas;
    m.heartbeat_timeout_ms = 2000;
    m.dead_after_secs = 4;
    m.orphan_piece_grace_secs = 10;
    m.copies_per_node = 32;
    m.session_timeout_ms = 10_000;
    if let Some(c) = config.client.as_mut() {
        c.data_timeout_ms = 10_000;
    }
}

fn cluster(daemons: usize, tweak: fn(&mut Config)) -> Cluster {
    Cluster::with(Options {
        storage_daemons: daemons,
        tweak,
        ..Options::default()
    })
}

/// Deterministic pseudo-random bytes (a different stream per seed).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn healthy(r: &ClusterReport, replicas: u64) -> bool {
    let d = &r.redundancy;
    d.scanned_ms_ago < 5000
        && d.under_replicated == 0
        && d.unavailable == 0
        && d.lost == 0
        && d.repairs_in_flight == 0
        && d.moves_in_flight == 0
        && d.copies == d.pieces * replicas
}

/// Piece files on the daemons that are up, against what the metaserver references.
fn stored_copies(cluster: &Cluster, daemons: &[String]) -> usize {
    daemons.iter().map(|d| cluster.stored_pieces(d)).sum()
}

fn pieces_of(cluster: &Cluster, path: &Path) -> Vec<(u64, u64, Vec<String>)> {
    let located = locate(cluster, &[path.to_owned()]);
    located[0]
        .chunks
        .iter()
        .map(|c| (c.piece, c.len, c.nodes.iter().map(|n| n.name.clone()).collect()))
        .collect()
}

/// Fault tests 1 and 2: replicas = 2 on three daemons; one is killed while `cp` writes a
/// 500 MiB file and a loop writes small files. Every write that succeeded reads back, before
/// and after the grace period, and afterwards every piece has two copies again.
#[test]
fn a_daemon_killed_during_writes_loses_nothing_and_is_healed_around() {
    let _serial = serial();
    let mut cluster = cluster(3, |c| fast(c, 2));
    let mnt = cluster.mount();
    let src_dir = tempfile::tempdir().expect("tmp");
    let big_src = src_dir.path().join("big");
    fs::write(&big_src, pattern(1, 500 << 20)).expect("source file");

    let stop = Arc::new(AtomicBool::new(false));
    let small = {
        let (mnt, stop) = (mnt.clone(), stop.clone());
        std::thread::spawn(move || {
            fs::create_dir(mnt.join("small")).expect("mkdir");
            let mut ok: Vec<(PathBuf, u64)> = Vec::new();
            let mut failed = 0;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = mnt.join(format!("small/f{i}"));
                let data = pattern(1000 + i, 1000 + (i as usize * 37) % 60_000);
                let started = Instant::now();
                match write_file(&p, &data) {
                    Ok(()) => ok.push((p, 1000 + i)),
                    Err(e) => {
                        failed += 1;
                        eprintln!("small write {i} failed after {:?}: {e}", started.elapsed());
                    }
                }
                assert!(started.elapsed() < Duration::from_secs(30), "a write hung");
                i += 1;
            }
            (ok, failed)
        })
    };
    let cp = {
        let (src, dst) = (big_src.clone(), mnt.join("big"));
        std::thread::spawn(move || Command::new("cp").arg(&src).arg(&dst).status().expect("cp"))
    };
    std::thread::sleep(Duration::from_millis(1500));
    let victim = "storage-2";
    cluster.kill_daemon(victim);
    let killed_at = Instant::now();
    let cp_status = cp.join().expect("cp thread");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (written, failed) = small.join().expect("small writer");
    eprintln!(
        "cp finished {:?} after the kill; {} small files written, {failed} failed",
        killed_at.elapsed(),
        written.len()
    );
    assert!(
        cp_status.success(),
        "cp of 500 MiB failed although a copy of every piece survives"
    );
    assert!(written.len() > 20, "the small-file loop made progress");

    let check_all = |when: &str| {
        drop_caches();
        let started = Instant::now();
        cmp(&big_src, &mnt.join("big"));
        for (p, seed) in &written {
            let got = fs::read(p).unwrap_or_else(|e| panic!("{when}: reading {}: {e}", p.display()));
            let len = 1000 + ((seed - 1000) as usize * 37) % 60_000;
            assert!(got == pattern(*seed, len), "{when}: {} differs", p.display());
        }
        eprintln!("{when}: everything read back in {:?}", started.elapsed());
    };
    check_all("before the grace period");

    // Test 2: after the grace period, every piece is back at two copies.
    let survivors = vec!["storage-1".to_owned(), "storage-3".to_owned()];
    wait_until("every piece back at 2 copies", Duration::from_secs(180), || {
        cluster.try_status().is_some_and(|r| healthy(&r, 2))
    });
    let report = cluster.status();
    let dead = report
        .nodes
        .iter()
        .find(|n| n.node.name == victim)
        .expect("victim listed");
    assert_eq!(dead.state, dfs_proto::meta::NodeState::Dead);
    assert_eq!(dead.referenced_pieces, 0, "no copy is counted on the dead daemon");
    // Walking the survivors' data directories: two copies of every piece, nothing else.
    wait_until("unreferenced copies deleted", Duration::from_secs(60), || {
        stored_copies(&cluster, &survivors) as u64 == cluster.status().redundancy.copies
    });
    assert_eq!(
        stored_copies(&cluster, &survivors) as u64,
        2 * report.redundancy.pieces,
        "each piece stored twice on the surviving daemons"
    );
    for (piece, _, holders) in pieces_of(&cluster, &mnt.join("big")) {
        assert_eq!(holders.len(), 2, "piece {piece} on {holders:?}");
        assert!(!holders.contains(&victim.to_owned()));
        for h in &holders {
            assert!(cluster.piece_path(h, piece).exists(), "piece {piece} missing on {h}");
        }
    }
    check_all("after the repair");
    let text = run(Command::new(bin("dfs"))
        .args(["status", "--config"])
        .arg(cluster.config_path()));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("DEAD") && text.contains("redundancy: healthy"), "{text}");
}

/// Fault test 3: a fourth daemon joins a cluster holding 1,000 files; copies move to it until
/// usage is within the threshold, and reads during the moves all succeed.
#[test]
fn a_new_daemon_receives_data_until_balanced_while_reads_succeed() {
    let _serial = serial();
    let mut cluster = cluster(3, |c| fast(c, 1));
    let mnt = cluster.mount();
    let dir = mnt.join("files");
    fs::create_dir(&dir).expect("mkdir");
    for i in 0..1000u64 {
        write_file(&dir.join(format!("f{i}")), &pattern(i, 32 << 10)).expect("write");
    }
    let before = cluster.status();
    assert!(before.nodes.iter().all(|n| n.referenced_pieces > 300));

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                drop_caches();
                for i in (0..1000u64).step_by(7) {
                    let got = fs::read(dir.join(format!("f{i}"))).expect("read during moves");
                    assert!(got == pattern(i, 32 << 10), "f{i} differs during moves");
                    reads += 1;
                }
            }
            reads
        })
    };
    let newcomer = cluster.add_daemon();
    cluster.wait_all_up();
    let threshold = 10u64;
    let balanced = |r: &ClusterReport| {
        let up: Vec<_> = r.nodes.iter().filter(|n| n.node.up).collect();
        let total: u64 = up.iter().map(|n| n.referenced_bytes).sum();
        let mean = total / up.len().max(1) as u64;
        let tolerance = (mean * threshold / 100).max(1 << 20);
        up.len() == 4
            && up.iter().all(|n| n.referenced_bytes.abs_diff(mean) <= tolerance)
            && r.redundancy.moves_in_flight == 0
    };
    wait_until("usage balanced within 10%", Duration::from_secs(240), || {
        cluster.try_status().is_some_and(|r| balanced(&r))
    });
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reads during moves all succeeded");
    let after = cluster.status();
    let new = after.nodes.iter().find(|n| n.node.name == newcomer).unwrap();
    eprintln!(
        "{reads} reads during the moves; {newcomer} now holds {} pieces ({} moves)",
        new.referenced_pieces, after.redundancy.moves_done
    );
    assert!(new.referenced_pieces > 150, "{newcomer} received its share");
    // The old copies are deleted once moved: every daemon stores what it is credited with.
    wait_until(
        "moved copies deleted from their old daemons",
        Duration::from_secs(60),
        || {
            let r = cluster.status();
            r.nodes
                .iter()
                .all(|n| cluster.stored_pieces(&n.node.name) as u64 == n.referenced_pieces)
        },
    );
    drop_caches();
    for i in 0..1000u64 {
        assert!(fs::read(dir.join(format!("f{i}"))).unwrap() == pattern(i, 32 << 10));
    }
}

/// Fault test 4: `dfs drain` empties a daemon; afterwards it holds nothing and every file reads
/// back.
#[test]
fn drain_empties_a_daemon_and_every_file_reads_back() {
    let _serial = serial();
    let mut cluster = cluster(3, |c| fast(c, 2));
    let mnt = cluster.mount();
    let mut files = BTreeMap::new();
    for i in 0..150u64 {
        let p = mnt.join(format!("f{i}"));
        let data = pattern(i, 1 + (i as usize * 7919) % (3 << 20));
        write_file(&p, &data).expect("write");
        files.insert(p, data);
    }
    let victim = "storage-1";
    assert!(cluster.stored_pieces(victim) > 0);
    let out = run(Command::new(bin("dfs"))
        .args(["drain", victim, "--config"])
        .arg(cluster.config_path()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("safe to"), "{text}");
    assert!(text.contains('%'), "progress is shown: {text}");
    assert_eq!(cluster.stored_pieces(victim), 0, "the drained daemon holds nothing");
    let r = cluster.status();
    let drained = r.nodes.iter().find(|n| n.node.name == victim).unwrap();
    assert!(drained.draining && drained.referenced_pieces == 0);
    wait_until("every piece at 2 copies on the others", Duration::from_secs(20), || {
        cluster.try_status().is_some_and(|r| healthy(&r, 2))
    });
    // Nothing new goes to a draining daemon.
    write_file(&mnt.join("after"), b"new data").unwrap();
    assert!(pieces_of(&cluster, &mnt.join("after"))[0].2.iter().all(|h| h != victim));
    // It can be stopped: everything is elsewhere.
    cluster.kill_daemon(victim);
    drop_caches();
    for (p, data) in &files {
        assert!(
            &fs::read(p).expect("read after drain") == data,
            "{} differs",
            p.display()
        );
    }
}

/// Fault test 5: bytes flipped in a stored copy. The next read returns the right data (from
/// the other copy) and the bad copy is replaced; the scrub finds damage nobody reads.
#[test]
fn a_damaged_copy_is_detected_served_around_and_replaced() {
    let _serial = serial();
    let mut cluster = cluster(3, |c| {
        fast(c, 2);
        for s in &mut c.storaged {
            // The first pass starts 20 s after the daemon: after the read part below.
            s.scrub_interval_secs = 20;
        }
    });
    let mnt = cluster.mount();
    let read_file = mnt.join("read");
    let scrubbed_file = mnt.join("scrubbed");
    let data = pattern(5, 300_000);
    write_file(&read_file, &data).unwrap();
    write_file(&scrubbed_file, &data).unwrap();

    let flip = |cluster: &Cluster, path: &Path| -> (u64, String) {
        let (piece, _, holders) = pieces_of(cluster, path).remove(0);
        // The copy a read tries first (the mount starts at copy `piece % copies`).
        let victim = holders[(piece % holders.len() as u64) as usize].clone();
        let stored = cluster.piece_path(&victim, piece);
        let mut bytes = fs::read(&stored).unwrap();
        for b in &mut bytes[100_000..100_010] {
            *b ^= 0xff;
        }
        fs::write(&stored, &bytes).unwrap();
        (piece, victim)
    };
    let (piece, victim) = flip(&cluster, &read_file);
    // Make the damaged copy the one a read tries first, and the page cache empty.
    drop_caches();
    for _ in 0..3 {
        assert!(fs::read(&read_file).unwrap() == data, "the read returns the right data");
        drop_caches();
    }
    let good_copies = |cluster: &Cluster, path: &Path, piece: u64| {
        let pieces = pieces_of(cluster, path);
        pieces[0].2.len() == 2
            && pieces[0]
                .2
                .iter()
                .all(|h| fs::read(cluster.piece_path(h, piece)).is_ok_and(|s| s[..data.len()] == data[..]))
    };
    wait_until("the damaged copy replaced", Duration::from_secs(60), || {
        good_copies(&cluster, &read_file, piece) && cluster.try_status().is_some_and(|r| healthy(&r, 2))
    });
    for holder in pieces_of(&cluster, &read_file)[0].2.clone() {
        let stored = fs::read(cluster.piece_path(&holder, piece)).unwrap();
        assert!(stored[..data.len()] == data[..], "copy on {holder} is good");
    }
    let logs = cluster.logs();
    assert!(
        logs.contains("trying another copy"),
        "the read went around the damaged copy"
    );
    assert!(logs.contains(&format!("piece {piece}")), "the damage is reported");

    // Damage that no read meets: the scrub finds it.
    let (piece2, victim2) = flip(&cluster, &scrubbed_file);
    wait_until(
        "the scrub finds and replaces the damaged copy",
        Duration::from_secs(90),
        || good_copies(&cluster, &scrubbed_file, piece2),
    );
    eprintln!("damaged copies on {victim} and {victim2} replaced");
    drop_caches();
    assert!(fs::read(&scrubbed_file).unwrap() == data);
}

/// Fault test 6: the metaserver is killed with SIGKILL in the middle of creates, writes and
/// renames and restarted. Every operation that returned success is there; pieces written but
/// never committed are collected.
#[test]
fn metaserver_killed_mid_workload_keeps_every_acknowledged_operation() {
    let _serial = serial();
    let mut cluster = cluster(3, |c| fast(c, 2));
    let mnt = cluster.mount();
    fs::create_dir(mnt.join("w")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workload = {
        let (mnt, stop) = (mnt.clone(), stop.clone());
        std::thread::spawn(move || {
            // Files whose write and close succeeded -> seed of their content. A rename that
            // failed may still have happened (its answer lost with the metaserver): then the
            // file is under one of its two names.
            let mut done: BTreeMap<Vec<PathBuf>, u64> = BTreeMap::new();
            let mut dirs = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let tmp = mnt.join(format!("w/tmp{i}"));
                let data = pattern(i, 5000 + (i as usize * 131) % 200_000);
                if write_file(&tmp, &data).is_ok() {
                    let final_name = mnt.join(format!("w/file{i}"));
                    if !i.is_multiple_of(2) {
                        done.insert(vec![tmp], i);
                    } else if fs::rename(&tmp, &final_name).is_ok() {
                        done.insert(vec![final_name], i);
                    } else {
                        done.insert(vec![tmp, final_name], i);
                    }
                }
                if i.is_multiple_of(10) && fs::create_dir(mnt.join(format!("w/d{i}"))).is_ok() {
                    dirs.push(mnt.join(format!("w/d{i}")));
                }
                i += 1;
            }
            (done, dirs)
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    cluster.kill_metaserver();
    std::thread::sleep(Duration::from_secs(2));
    cluster.start_metaserver();
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let (done, dirs) = workload.join().expect("workload");
    eprintln!("{} files and {} directories acknowledged", done.len(), dirs.len());
    assert!(done.len() > 10);
    drop_caches();
    for (names, seed) in &done {
        let want = pattern(*seed, 5000 + (*seed as usize * 131) % 200_000);
        let p = names.iter().find(|p| p.exists()).unwrap_or(&names[0]);
        let got = fs::read(p).unwrap_or_else(|e| panic!("{} acknowledged but: {e}", p.display()));
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            let other = (0..2000u64).find(|&j| got == pattern(j, 5000 + (j as usize * 131) % 200_000));
            panic!(
                "{} differs: {} bytes, expected {}; first difference at {first:?}; content of file {other:?}",
                p.display(),
                got.len(),
                want.len()
            );
        }
    }
    for d in &dirs {
        assert!(d.is_dir(), "{} acknowledged but missing", d.display());
    }
    // Pieces written but never committed (the writes in flight at the kill) are collected:
    // the daemons then store exactly the copies the metaserver references.
    let names = cluster.daemon_names();
    wait_until("orphaned pieces collected", Duration::from_secs(120), || {
        cluster.try_status().is_some_and(|r| {
            r.pending_deletes == 0 && healthy(&r, 2) && stored_copies(&cluster, &names) as u64 == r.redundancy.copies
        })
    });
    // And the metaserver's database can be backed up online, and the copy opened.
    let backup = cluster.dir().join("meta-backup.redb");
    let out = run(Command::new(bin("dfs-metaserver"))
        .arg("--config")
        .arg(cluster.config_path())
        .arg("backup")
        .arg(&backup));
    assert!(out.status.success());
    assert!(fs::metadata(&backup).unwrap().len() > 4096);
}

/// Fault test 7: a daemon frozen (SIGSTOP) while its file is rewritten, then thawed: no read
/// returns the old data, and the daemon deletes the copy it no longer needs.
#[test]
fn a_partitioned_daemon_never_serves_stale_data_and_reconciles() {
    let _serial = serial();
    let mut cluster = cluster(3, |c| fast(c, 2));
    let mnt = cluster.mount();
    let file = mnt.join("f");
    let v1 = pattern(71, 200_000);
    write_file(&file, &v1).unwrap();
    let (old_piece, _, holders) = pieces_of(&cluster, &file).remove(0);
    let frozen = holders[0].clone();
    cluster.signal_daemon(&frozen, libc::SIGSTOP);
    cluster.wait_daemon_state(&frozen, false, Duration::from_secs(20));

    let v2 = pattern(72, 200_000);
    write_file(&file, &v2).expect("rewrite while a copy's daemon is away");
    drop_caches();
    assert!(fs::read(&file).unwrap() == v2);
    // Past the grace period the new version gets its second copy elsewhere.
    wait_until("the new version back at 2 copies", Duration::from_secs(60), || {
        cluster.try_status().is_some_and(|r| healthy(&r, 2))
    });

    cluster.signal_daemon(&frozen, libc::SIGCONT);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        drop_caches();
        assert!(fs::read(&file).unwrap() == v2, "a stale copy was served");
    }
    cluster.wait_daemon_state(&frozen, true, Duration::from_secs(20));
    wait_until(
        "the returning daemon deletes the old version",
        Duration::from_secs(60),
        || !cluster.piece_path(&frozen, old_piece).exists(),
    );
    let names = cluster.daemon_names();
    wait_until("stored copies match the metaserver", Duration::from_secs(60), || {
        cluster
            .try_status()
            .is_some_and(|r| r.pending_deletes == 0 && stored_copies(&cluster, &names) as u64 == r.redundancy.copies)
    });
    drop_caches();
    assert!(fs::read(&file).unwrap() == v2);
}

/// The replication factor set on a directory (`dfs replicas`, an xattr) passes to what is
/// created in it; a bad value is refused; the cluster default applies elsewhere.
#[test]
fn a_directory_replication_factor_is_inherited() {
    let _serial = serial();
    let mut cluster = cluster(3, |c| fast(c, 1));
    let mnt = cluster.mount();
    let dir = mnt.join("important");
    fs::create_dir(&dir).unwrap();
    let dfs = |args: &[&str]| {
        Command::new(bin("dfs"))
            .arg("replicas")
            .args(args)
            .output()
            .expect("dfs replicas")
    };
    let shown = dfs(&[dir.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("cluster default"));
    assert!(dfs(&[dir.to_str().unwrap(), "3"]).status.success());
    assert!(String::from_utf8_lossy(&dfs(&[dir.to_str().unwrap()]).stdout).contains(": 3"));
    fs::create_dir(dir.join("sub")).unwrap();
    write_file(&dir.join("sub/f"), &pattern(9, 100_000)).unwrap();
    write_file(&mnt.join("plain"), &pattern(9, 100_000)).unwrap();
    assert_eq!(
        pieces_of(&cluster, &dir.join("sub/f"))[0].2.len(),
        3,
        "inherited through a subdirectory"
    );
    assert_eq!(pieces_of(&cluster, &mnt.join("plain"))[0].2.len(), 1, "cluster default");
    let local = dfs(&["/tmp", "2"]);
    assert!(!local.status.success(), "a path outside dfs is refused");
    assert!(String::from_utf8_lossy(&local.stderr).contains("not on a dfs mount"));
    let bad = Command::new("setfattr")
        .args(["-n", "user.dfs.replicas", "-v", "9"])
        .arg(&dir)
        .output()
        .expect("setfattr");
    assert!(!bad.status.success(), "a factor above the maximum is refused");
    // Raising a file's factor adds copies.
    assert!(dfs(&[mnt.join("plain").to_str().unwrap(), "2"]).status.success());
    wait_until("the file gets its second copy", Duration::from_secs(30), || {
        pieces_of(&cluster, &mnt.join("plain"))[0].2.len() == 2
    });
}
