//! Prints the latency of namespace writes through the committer (no network), sequential and
//! concurrent: `cargo run --release -p dfs-metaserver --example commit_latency`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dfs_metaserver::service::{MetaService, Settings};
use dfs_proto::meta::MakeNode;
use dfs_proto::types::{FileKind, ROOT_INO};

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = dfs_metaserver::db::open(&dir.path().join("meta.redb"), 8 << 20).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let svc = MetaService::start(
            Arc::new(db),
            dir.path().to_owned(),
            Settings {
                chunk_size: 8 << 20,
                heartbeat_timeout: Duration::from_secs(5),
                session_timeout: Duration::from_secs(30),
                orphan_piece_grace: Duration::from_secs(3600),
                replicas: 1,
                dead_after: Duration::from_secs(600),
                balance_threshold_percent: 10,
                copies_per_node: 4,
            },
        )
        .unwrap();
        let mk = |i: usize| MakeNode {
            parent: ROOT_INO,
            name: format!("d{i}").into_bytes(),
            kind: FileKind::Directory,
            perm: 0o755,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: vec![],
        };
        let n = 2000;
        let t = Instant::now();
        for i in 0..n {
            svc.make_node(mk(i)).await.unwrap();
        }
        let e = t.elapsed();
        println!(
            "sequential mkdir: {:.3} ms each, {:.0}/s",
            e.as_secs_f64() * 1e3 / n as f64,
            n as f64 / e.as_secs_f64()
        );
        let t = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..n {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move { svc.make_node(mk(n + i)).await.unwrap() }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let e = t.elapsed();
        println!("{n} concurrent mkdirs: {:.0}/s", n as f64 / e.as_secs_f64());

        let session = svc
            .open_session(dfs_proto::meta::OpenSession {
                client: "bench".into(),
                resume: None,
                open_files: vec![],
                locks: vec![],
            })
            .await
            .unwrap()
            .session;
        svc.register_node(dfs_proto::meta::RegisterNode {
            domain: None,
            name: "storage-1".into(),
            addr: "127.0.0.1:1".into(),
            usage: dfs_proto::types::NodeUsage {
                free_bytes: 1 << 40,
                capacity_bytes: 1 << 40,
                ..Default::default()
            },
        })
        .await
        .unwrap();
        let t = Instant::now();
        let mut created = Vec::new();
        for i in 0..n {
            let c = svc
                .create(dfs_proto::meta::Create {
                    parent: ROOT_INO,
                    name: format!("f{i}").into_bytes(),
                    perm: 0o644,
                    uid: 0,
                    gid: 0,
                    exclusive: true,
                    session,
                    handle: i as u64,
                    released: vec![],
                })
                .await;
            created.push(c);
        }
        let e = t.elapsed();
        let failures = created.iter().filter(|c| c.is_err()).count();
        println!(
            "sequential create ({failures} of {n} failed): {:.3} ms each",
            e.as_secs_f64() * 1e3 / n as f64
        );
        let t = Instant::now();
        for (i, c) in created.iter().enumerate() {
            let c = c.as_ref().unwrap();
            let piece = c.first_piece.as_ref().unwrap();
            svc.commit_write(dfs_proto::meta::CommitWrite {
                ino: c.attr.ino,
                pieces: vec![dfs_proto::meta::WrittenPiece {
                    chunk: 0,
                    piece: piece.piece,
                    nodes: piece.nodes.iter().map(|n| n.id).collect(),
                    len: 4096,
                }],
                min_size: 4096 + i as u64 % 2,
                attrs: Default::default(),
                id: dfs_proto::meta::CommitId {
                    client: 1,
                    seq: i as u64,
                    settled_below: i as u64,
                },
                fence: None,
                pieces_in_flight: false,
            })
            .await
            .unwrap();
        }
        println!(
            "sequential commit_write: {:.3} ms each",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    });
}
