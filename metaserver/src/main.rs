use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    dfs_common::logging::init("dfs-metaserver");
    let config = Config::load(&args.config)?;
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
    };

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let svc = MetaService::start(Arc::new(db), settings)?;
        let endpoint = dfs_proto::endpoint::server(listen, tls.server_config()?, None, &tls.reset_secret())?;
        tracing::info!(
            "metaserver listening on {listen}, database {}, chunk size {} bytes",
            db_path.display(),
            svc.chunk_size()
        );
        tokio::spawn(dfs_metaserver::server::housekeeping(svc.clone()));
        tokio::spawn(dfs_metaserver::server::serve(endpoint.clone(), svc));
        dfs_common::process::shutdown_signal().await;
        tracing::info!("metaserver shutting down");
        endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        anyhow::Ok(())
    })
}
