use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dfs_admin::{drain, local, locate, metrics_view, mount_helper, replicas, status, up};
use dfs_common::config::{Config, DEFAULT_PATH};
use dfs_proto::certs;

/// dfs admin tool.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a whole cluster on this machine and mount it (stays in the foreground).
    Up {
        /// Where to mount the file system.
        mountpoint: PathBuf,
        /// Cluster directory (certificates, config, data); reused if it exists.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Number of storage daemons (default 3 for a new cluster).
        #[arg(long)]
        storage_daemons: Option<usize>,
        /// Copies of every piece of data (the cluster default; directories may override it
        /// with `dfs replicas`).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=dfs_common::config::MAX_REPLICAS as i64))]
        replicas: Option<u8>,
    },
    /// Empty a storage daemon onto the others before retiring it (shows progress).
    Drain {
        /// The daemon's name, as in `dfs status`.
        node: String,
        /// Stop draining: the daemon takes new data again.
        #[arg(long)]
        cancel: bool,
        /// Start the drain and return without following it.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Storage daemons: `dfs node forget NAME` removes a dead or drained one for good.
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// Show or set the replication factor of files or directories on a dfs mount (a
    /// directory's passes to new files and directories created in it).
    Replicas {
        path: PathBuf,
        /// New factor; without it, the current one is shown.
        #[arg(value_parser = clap::value_parser!(u8).range(1..=dfs_common::config::MAX_REPLICAS as i64))]
        replicas: Option<u8>,
    },
    /// Show storage daemons, their usage, and file counts.
    Status {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Print the raw report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show which storage daemons hold the chunks of files on a dfs mount.
    Locate {
        /// Files on a mounted dfs file system.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the latency of every kind of request a dfs process served (count, mean, p50, p90,
    /// p99), from its metrics address (`dfs up` prints them; `metrics_listen` in dfs.toml).
    Metrics {
        /// http://HOST:PORT/metrics, or HOST:PORT.
        #[arg(required = true)]
        urls: Vec<String>,
        /// Print the raw metrics text instead.
        #[arg(long)]
        raw: bool,
    },
    /// Manage the cluster's certificates.
    Cert {
        #[command(subcommand)]
        command: CertCmd,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Remove a storage daemon that is stopped for good (dead, or drained and retired): its
    /// queued deletions and the copies recorded on it are dropped. Refused while it is up or
    /// holds the only copy of anything.
    Forget {
        /// The daemon's name, as in `dfs status`.
        node: String,
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CertCmd {
    /// Create the cluster CA (ca.crt, and ca.key which must stay secret).
    Init {
        #[arg(long, default_value = "/etc/dfs/certs")]
        dir: PathBuf,
    },
    /// Issue a certificate for a metaserver, storage daemon or client.
    Issue {
        /// The node's name (also its TLS server name), e.g. metaserver, storage-1, client.
        #[arg(long)]
        name: String,
        /// Extra DNS names or IP addresses the certificate is valid for.
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long, default_value = "/etc/dfs/certs")]
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some((mountpoint, options)) = mount_helper::invocation(&raw) {
        return mount_helper::run(mountpoint, options).map_err(anyhow::Error::msg);
    }
    let args = Args::parse();
    match args.command {
        Cmd::Cert { command } => cert(command),
        Cmd::Metrics { urls, raw } => {
            let rt = runtime()?;
            for url in &urls {
                let text = rt.block_on(metrics_view::fetch(url, Duration::from_secs(5)))?;
                if raw {
                    print!("{text}");
                } else {
                    println!("{url}");
                    print!("{}", metrics_view::render(&metrics_view::latencies(&text)));
                }
            }
            Ok(())
        }
        Cmd::Status { config, json } => {
            let config = Config::load(&config)?;
            let report = runtime()?.block_on(status::fetch(&config, Duration::from_secs(5)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", status::render(&report));
            }
            Ok(())
        }
        Cmd::Locate { paths, config, json } => {
            let config = Config::load(&config)?;
            let located = runtime()?.block_on(locate::locate(&config, &paths, Duration::from_secs(5)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&located)?);
            } else {
                print!("{}", locate::render(&located));
            }
            Ok(())
        }
        Cmd::Drain {
            node,
            cancel,
            no_wait,
            config,
        } => {
            let config = Config::load(&config)?;
            let finished = runtime()?.block_on(drain::run(&config, &node, cancel, !no_wait))?;
            if !finished && !no_wait {
                std::process::exit(2);
            }
            Ok(())
        }
        Cmd::Node {
            command: NodeCmd::Forget { node, config },
        } => {
            let config = Config::load(&config)?;
            let forgotten = runtime()?.block_on(drain::forget(&config, &node))?;
            println!(
                "{node} forgotten: {} copies recorded there dropped (the others remain and are re-made), {} queued deletions dropped",
                forgotten.copies_dropped, forgotten.deletions_dropped
            );
            Ok(())
        }
        Cmd::Replicas { path, replicas: None } => {
            match replicas::get(&path)? {
                Some(n) => println!("{}: {n}", path.display()),
                None => println!("{}: cluster default", path.display()),
            }
            Ok(())
        }
        Cmd::Replicas {
            path,
            replicas: Some(n),
        } => {
            replicas::set(&path, n)?;
            println!("{}: {n}", path.display());
            Ok(())
        }
        Cmd::Up {
            mountpoint,
            data_dir,
            storage_daemons,
            replicas,
        } => {
            dfs_common::logging::init("dfs");
            let opts = up::UpOptions {
                mountpoint,
                dir: data_dir.unwrap_or_else(local::default_dir),
                storage_daemons,
                replicas,
            };
            runtime()?.block_on(up::run(opts))?;
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn cert(command: CertCmd) -> anyhow::Result<()> {
    match command {
        CertCmd::Init { dir } => {
            let ca = certs::generate_ca("dfs cluster CA")?;
            certs::write_pair(&dir, "ca", &ca)?;
            println!(
                "created {} and {}",
                certs::cert_path(&dir, "ca").display(),
                certs::key_path(&dir, "ca").display()
            );
            println!("copy ca.crt to every machine; keep ca.key on this one only");
        }
        CertCmd::Issue { name, sans, dir } => {
            let ca = certs::read_pair(&dir, "ca").context("the CA is needed to issue certificates (dfs cert init)")?;
            let pair = certs::issue(&ca, &name, &sans)?;
            certs::write_pair(&dir, &name, &pair)?;
            println!(
                "issued {} and {}",
                certs::cert_path(&dir, &name).display(),
                certs::key_path(&dir, &name).display()
            );
        }
    }
    Ok(())
}
