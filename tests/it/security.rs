//! Only holders of a certificate from the cluster's CA get in.

use std::time::Duration;

use dfs_proto::certs;
use dfs_proto::meta::ClusterStatus;
use dfs_proto::storage::Ping;
use dfs_proto::tls::{TlsFiles, TlsIdentity};
use dfs_proto::{Peer, RpcError};
use dfs_tests::Cluster;
use rustls::pki_types::pem::PemObject;

/// Calls the metaserver and a storage daemon with the given identity.
fn try_both(cluster: &Cluster, identity: &TlsIdentity) -> (Result<(), RpcError>, Result<(), RpcError>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let endpoint = dfs_proto::endpoint::client(identity.client_config().unwrap()).unwrap();
        let t = Duration::from_secs(3);
        let meta = Peer::new(
            endpoint.clone(),
            cluster.config.cluster.metaserver.clone(),
            "metaserver",
            t,
        );
        let s = &cluster.config.storaged[0];
        let daemon = Peer::new(endpoint.clone(), s.listen.clone(), s.name.clone(), t);
        let a = meta.call(ClusterStatus {}, t).await.map(|_| ());
        let b = daemon.call(Ping {}, t).await.map(|_| ());
        (a, b)
    })
}

#[test]
fn peers_without_a_cluster_certificate_are_refused() {
    let cluster = Cluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let cluster_ca = cluster.config.resolve(&cluster.config.cluster.ca_cert);

    // Control: the cluster's own client certificate works against both.
    let client = cluster.config.client().unwrap();
    let good = TlsIdentity::load(&cluster.config.tls_files(&client.cert, &client.key)).unwrap();
    let (a, b) = try_both(&cluster, &good);
    a.expect("metaserver accepts a cluster certificate");
    b.expect("storage daemon accepts a cluster certificate");

    // A certificate from another CA (trusting the cluster CA, so only the server can object).
    let rogue_ca = certs::generate_ca("rogue CA").unwrap();
    let rogue = certs::issue(&rogue_ca, "client", &[]).unwrap();
    certs::write_pair(dir.path(), "rogue", &rogue).unwrap();
    let rogue_identity = TlsIdentity::load(&TlsFiles {
        ca_cert: cluster_ca.clone(),
        cert: certs::cert_path(dir.path(), "rogue"),
        key: certs::key_path(dir.path(), "rogue"),
    })
    .unwrap();
    let (a, b) = try_both(&cluster, &rogue_identity);
    let a = a.expect_err("metaserver must refuse a foreign certificate");
    let b = b.expect_err("storage daemon must refuse a foreign certificate");
    assert!(a.is_unavailable() && b.is_unavailable(), "{a} / {b}");
    std::thread::sleep(Duration::from_millis(300));
    let logs = cluster.logs();
    assert!(
        logs.matches("refused connection").count() >= 2,
        "refusals are logged:\n{logs}"
    );

    // No client certificate at all (the cluster CA is trusted, so only the server can object).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        let ca_pem = std::fs::read(&cluster_ca).unwrap();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![dfs_proto::tls::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let endpoint = dfs_proto::endpoint::client(quinn::ClientConfig::new(std::sync::Arc::new(quic))).unwrap();
        let t = Duration::from_secs(3);
        let meta = Peer::new(endpoint, cluster.config.cluster.metaserver.clone(), "metaserver", t);
        let err = meta
            .call(ClusterStatus {}, t)
            .await
            .expect_err("a client without a certificate must be refused");
        assert!(err.is_unavailable(), "{err}");
    });

    // The other way round: a server with a foreign certificate is refused by a cluster client.
    let s = &cluster.config.storaged[0];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let rogue_server = TlsIdentity::load(&TlsFiles {
            ca_cert: cluster_ca.clone(),
            cert: certs::cert_path(dir.path(), "rogue"),
            key: certs::key_path(dir.path(), "rogue"),
        })
        .unwrap();
        let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = dfs_proto::endpoint::server(addr, rogue_server.server_config().unwrap(), None, &[7; 32]).unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        });
        let endpoint = dfs_proto::endpoint::client(good.client_config().unwrap()).unwrap();
        let t = Duration::from_secs(3);
        let impostor = Peer::new(endpoint, format!("127.0.0.1:{port}"), s.name.clone(), t);
        let err = impostor
            .call(Ping {}, t)
            .await
            .expect_err("a server outside the CA must be refused");
        assert!(err.is_unavailable(), "{err}");
    });
}

#[test]
fn a_cluster_on_ipv6_loopback_works() {
    let mut cluster = Cluster::with(dfs_tests::Options {
        storage_daemons: 2,
        host: "::1",
        ..Default::default()
    });
    assert!(cluster.config.cluster.metaserver.starts_with("[::1]:"));
    let mnt = cluster.mount();
    let body = dfs_tests::data::bytes(200_000, 9);
    std::fs::write(mnt.join("v6"), &body).unwrap();
    assert_eq!(std::fs::read(mnt.join("v6")).unwrap(), body);
}
