//! Writes held back by a mount reach the cluster without a close when the writer goes idle.
//!
//! Alone in its test binary on purpose: a process that forks while it holds a file open (as
//! the other tests do to run cp or tar) makes the child close an inherited copy of the
//! descriptor at exec, which is a real close (a FUSE flush) that commits the writes.

use dfs_tests::{Cluster, cmp, data, write_both};

#[test]
fn a_writer_that_pauses_keeps_its_data_and_others_see_it_before_close() {
    let mut cluster = Cluster::start(2);
    let mnt = cluster.mount();
    let other = cluster.mount();
    let local = tempfile::tempdir().unwrap();
    let mounted = std::fs::File::create(mnt.join("slow")).unwrap();
    let model = std::fs::File::create(local.path().join("slow")).unwrap();
    let first = data::bytes(300_000, 1);
    write_both(&mounted, &model, 0, &first);
    // The mount commits a writer's data once it has been idle for 10 s, so another mount sees it
    // even though the file is still open (and the stream to the daemon does not sit idle).
    let started = std::time::Instant::now();
    dfs_tests::wait_until(
        "the idle writer's data to be committed",
        std::time::Duration::from_secs(25),
        || std::fs::read(other.join("slow")).is_ok_and(|d| d == first),
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(8),
        "committed before the writer was idle"
    );
    write_both(&mounted, &model, 250_000, &data::bytes(100_000, 2));
    drop(mounted);
    drop(model);
    cmp(&local.path().join("slow"), &mnt.join("slow"));
    cmp(&local.path().join("slow"), &other.join("slow"));
}
