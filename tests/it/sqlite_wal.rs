//! SQLite in WAL mode: its `-shm` file is a shared memory mapping, whose dirty pages only the
//! mount itself can write back. The mount once hung here for good (an invalidation of that
//! file's pages, made from an async worker, waited for a writeback that needed the worker).
//! Every workload here must run to completion, within a deadline, with an intact database.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dfs_tests::{Cluster, run};

/// Longest the whole workload may take (it takes seconds when nothing hangs).
const DEADLINE: Duration = Duration::from_secs(240);

/// The workload: a table filled in transactions, an index, updates, deletes, 200 small
/// transactions, VACUUM; then the numbers it must end with.
fn workload() -> String {
    let mut sql = String::from(
        ".timeout 30000\npragma journal_mode=wal;\ncreate table t(id integer primary key, k int, v text);\n",
    );
    for batch in 0..10 {
        sql.push_str("begin;\n");
        for i in 0..100 {
            let id = batch * 100 + i;
            sql.push_str(&format!(
                "insert into t(k, v) values({}, '{}');\n",
                id % 37,
                "x".repeat(100 + id % 50)
            ));
        }
        sql.push_str("commit;\n");
    }
    sql.push_str("create index t_k on t(k);\nupdate t set v = v || 'u' where k < 10;\ndelete from t where k = 36;\n");
    for i in 0..200 {
        sql.push_str(&format!("insert into t(k, v) values({}, 'small {i}');\n", 100 + i));
    }
    sql.push_str("vacuum;\npragma wal_checkpoint(truncate);\n");
    sql
}

/// Rows at the end: 1000 inserted, those with k = 36 deleted (ids 36, 73, ...), 200 more.
fn expected_rows() -> usize {
    1000 - (0..1000).filter(|id| id % 37 == 36).count() + 200
}

/// Runs the workload with sqlite3 against `db`, killing it if it outlives the deadline.
fn spawn_writer(db: &Path) -> Child {
    let mut child = Command::new("sqlite3")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sqlite3");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(workload().as_bytes())
        .expect("feed sqlite3");
    child
}

/// Waits for `child`, failing the test if it does not finish in time (a hang).
fn finish(mut child: Child, what: &str, started: Instant) -> std::process::Output {
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("{what} did not finish within {DEADLINE:?}: the mount hung");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("output")
}

/// Reads `db` in a loop (another process) until `stop` says so; returns how many reads
/// succeeded and the errors met.
fn reader(
    db: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    let db = db.to_owned();
    std::thread::spawn(move || {
        let (mut ok, mut errors) = (0, Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let out = Command::new("timeout")
                .args(["60", "sqlite3", "-cmd", ".timeout 30000"])
                .arg(&db)
                .arg("select count(*), coalesce(sum(length(v)), 0) from t;")
                .output()
                .expect("sqlite3 reader");
            if out.status.success() {
                ok += 1;
            } else {
                errors.push(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (ok, errors)
    })
}

fn check(db: &Path) {
    let out = run(Command::new("timeout")
        .args(["60", "sqlite3"])
        .arg(db)
        .arg("pragma integrity_check; select count(*) from t;"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("ok\n{}\n", expected_rows()),
        "the database at the end"
    );
}

/// Runs the workload on `db` while another process reads `read_db` in a loop; fails the test
/// if the writer hangs or fails. Returns the reads that succeeded and the errors of the others.
fn write_while_reading(db: &Path, read_db: &Path) -> (usize, Vec<String>) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let writer = spawn_writer(db);
    std::thread::sleep(Duration::from_millis(300));
    let reading = reader(read_db, stop.clone());
    let out = finish(writer, "the sqlite3 writer", started);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, errors) = reading.join().unwrap();
    assert!(
        out.status.success(),
        "writer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "writer done in {:?}; {reads} reads, {} refused: {errors:?}",
        started.elapsed(),
        errors.len()
    );
    (reads, errors)
}

#[test]
fn wal_mode_with_a_second_process_reading_completes() {
    let mut cluster = Cluster::start(2);
    let mnt = cluster.mount();
    let db = mnt.join("work.db");
    let (reads, errors) = write_while_reading(&db, &db);
    // Readers in the same mount see a consistent database (they may be told it is busy).
    assert!(
        errors
            .iter()
            .all(|e| e.contains("locked") || e.contains("busy") || e.contains("no such table")),
        "{errors:?}"
    );
    assert!(reads > 0, "the reader never got through");
    check(&db);
    // What was committed is stored: it reads back intact through a fresh mount.
    cluster.unmount(&mnt);
    let fresh = cluster.mount();
    check(&fresh.join("work.db"));
}

#[test]
fn wal_mode_across_two_mounts_completes() {
    let mut cluster = Cluster::start(2);
    let (a, b) = (cluster.mount(), cluster.mount());
    // WAL needs shared memory, which two machines do not share: the reader on the other
    // mount is refused (its `-shm` cannot be mapped shared while the writer's mount has it
    // open: two_mounts.rs `a_shared_writable_mapping_exists_on_one_mount_at_a_time`; before,
    // its stale index, written back, once cost the writer a transaction), but nothing may
    // hang, and the writer's database stays intact.
    let (_, errors) = write_while_reading(&a.join("two.db"), &b.join("two.db"));
    assert!(
        errors.iter().all(|e| !e.contains("Terminated") && !e.is_empty()),
        "a reader hung: {errors:?}"
    );
    check(&a.join("two.db"));
    check(&b.join("two.db"));
}
