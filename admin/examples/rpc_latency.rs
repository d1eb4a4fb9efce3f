//! Prints metaserver round-trip latency for a read-only and a durable request, without FUSE:
//! `cargo run --release -p dfs-admin --example rpc_latency -- CONFIG`.

use std::time::{Duration, Instant};

use dfs_common::Config;
use dfs_proto::Peer;
use dfs_proto::meta::{GetAttr, MakeNode, RemoveDir};
use dfs_proto::tls::TlsIdentity;
use dfs_proto::types::{FileKind, ROOT_INO};

fn main() {
    let path = std::env::args().nth(1).expect("usage: rpc_latency CONFIG");
    let config = Config::load(std::path::Path::new(&path)).unwrap();
    let client = config.client().unwrap();
    let tls = TlsIdentity::load(&config.tls_files(&client.cert, &client.key)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let endpoint = dfs_proto::endpoint::client(tls.client_config().unwrap()).unwrap();
        let t = Duration::from_secs(5);
        let peer = Peer::new(
            endpoint,
            config.cluster.metaserver.clone(),
            config.cluster.metaserver_name.clone(),
            t,
        );
        peer.call(GetAttr { ino: ROOT_INO }, t).await.unwrap();
        let n = 2000;
        let start = Instant::now();
        for _ in 0..n {
            peer.call(GetAttr { ino: ROOT_INO }, t).await.unwrap();
        }
        println!("GetAttr: {:.3} ms", start.elapsed().as_secs_f64() * 1e3 / n as f64);
        let n = 500;
        let start = Instant::now();
        for i in 0..n {
            let name = format!("rpc-latency-{i}").into_bytes();
            peer.call(
                MakeNode {
                    parent: ROOT_INO,
                    name,
                    kind: FileKind::Directory,
                    perm: 0o755,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    target: vec![],
                },
                t,
            )
            .await
            .unwrap();
        }
        println!(
            "MakeNode (durable): {:.3} ms",
            start.elapsed().as_secs_f64() * 1e3 / n as f64
        );
        for i in 0..n {
            let name = format!("rpc-latency-{i}").into_bytes();
            peer.call(RemoveDir { parent: ROOT_INO, name }, t).await.unwrap();
        }
    });
}
