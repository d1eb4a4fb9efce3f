use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dfs_common::config::{Config, DEFAULT_PATH};
use dfs_metaserver::service::{MetaService, Settings};
use dfs_proto::tls::TlsIdentity;

/// dfs metadata server: namespace, placement and the registry of storage daemons.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// Override the listen address (host:port).
    #[arg(long)]
    listen: Option<String>,
    /// Override the database directory.
    #[arg(long)]
    db_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Take a consistent snapshot of the running metaserver's database and write it to FILE
    /// (restore: stop the metaserver, put FILE in place of `<db_dir>/meta.redb`, remove
    /// `<db_dir>/meta.wal`, start it).
    Backup {
        /// Where to write the snapshot (a redb database file).
        out: PathBuf,
    },
}

/// Fetches a snapshot from the running metaserver into `out` (written to a temporary file,
/// fsync'd, then renamed into place).
async fn backup(config: &Config, out: &std::path::Path) -> anyhow::Result<()> {
    use dfs_proto::meta::{Backup, BackupRead};
    use std::io::Write;
    let me = config.metaserver()?;
    // On the metaserver's machine its own certificate is at hand; any cluster certificate works.
    let (cert, key) = match config.client() {
        Ok(c) => (c.cert.clone(), c.key.clone()),
        Err(_) => (me.cert.clone(), me.key.clone()),
    };
    let tls = TlsIdentity::load(&config.tls_files(&cert, &key))?;
    let endpoint = dfs_proto::endpoint::client(tls.client_config()?)?;
    let timeout = Duration::from_secs(30);
    let peer = dfs_proto::Peer::new(
        endpoint.clone(),
        config.cluster.metaserver.clone(),
        config.cluster.metaserver_name.clone(),
        timeout,
    );
    let snapshot = peer.call(Backup {}, Duration::from_secs(600)).await?;
    let tmp = out.with_extension("partial");
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut offset = 0;
    while offset < snapshot.len {
        let bytes = peer
            .call(
                BackupRead {
                    id: snapshot.id,
                    offset,
                },
                timeout,
            )
            .await?;
        if bytes.is_empty() {
            anyhow::bail!("snapshot ended at {offset} of {} bytes", snapshot.len);
        }
        file.write_all(&bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        offset += bytes.len() as u64;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot rename to {}", out.display()))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    endpoint.close(0u32.into(), b"done");
    println!(
        "wrote a snapshot of the metaserver's database to {} ({offset} bytes)",
        out.display()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    dfs_common::logging::init("dfs-metaserver");
    let config = Config::load(&args.config)?;
    if let Some(Cmd::Backup { out }) = &args.command {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return runtime.block_on(backup(&config, out));
    }
    let mut me = config.metaserver()?.clone();
    if let Some(v) = args.listen {
        me.listen = v;
    }
    if let Some(v) = args.db_dir {
        me.db_dir = v;
    }
    let listen = dfs_common::config::listen_addr(&me.listen)?;
    let db_dir = config.resolve(&me.db_dir);
    std::fs::create_dir_all(&db_dir).with_context(|| format!("cannot create {}", db_dir.display()))?;
    let db_path = db_dir.join("meta.redb");
    let db = dfs_metaserver::db::open(&db_path, me.chunk_size)
        .with_context(|| format!("cannot open metadata database {}", db_path.display()))?;
    let tls = TlsIdentity::load(&config.tls_files(&me.cert, &me.key))?;
    let settings = Settings {
        chunk_size: me.chunk_size,
        heartbeat_timeout: Duration::from_millis(me.heartbeat_timeout_ms),
        session_timeout: Duration::from_millis(me.session_timeout_ms),
        orphan_piece_grace: Duration::from_secs(me.orphan_piece_grace_secs),
        replicas: me.replicas,
        dead_after: Duration::from_secs(me.dead_after_secs),
        balance_threshold_percent: me.balance_threshold_percent,
        copies_per_node: me.copies_per_node,
    };

    // One thread runs the network and the requests; the commit thread and the blocking pool
    // (scans) are apart. On few cores every cross-thread wakeup costs more than the work of
    // a request (see ARCHITECTURE.md, "Where the time goes").
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let svc = MetaService::start(Arc::new(db), db_dir.clone(), settings)?;
        let endpoint = dfs_proto::endpoint::server(listen, tls.server_config()?, None, &tls.reset_secret())?;
        tracing::info!(
            "metaserver listening on {listen}, database {}, chunk size {} bytes",
            db_path.display(),
            svc.chunk_size()
        );
        let metrics = dfs_common::metrics::Metrics::new("dfs_metaserver");
        svc.metrics().register(&metrics);
        dfs_common::metrics::serve_if_configured(me.metrics_listen.as_deref(), &metrics).await?;
        tokio::spawn(dfs_metaserver::server::housekeeping(svc.clone()));
        tokio::spawn(dfs_metaserver::server::serve(endpoint.clone(), svc));
        dfs_common::process::shutdown_signal().await;
        tracing::info!("metaserver shutting down");
        endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        anyhow::Ok(())
    })
}
