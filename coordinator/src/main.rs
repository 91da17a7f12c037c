//! The `coordinator` command line: serve a sweep to workers (`coordinator --sweep FILE`),
//! show where sweeps stand (`coordinator status`) and print their tables
//! (`coordinator report`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use coordinator::report::{Format, Report};
use coordinator::scheduler::Policy;
use coordinator::serve::{ServeOptions, serve};
use coordinator::store::Store;

/// Run sweeps of discrete latent-variable models on pulling workers.
#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The sweep file to run (YAML).
    #[arg(long, value_name = "FILE")]
    sweep: Option<PathBuf>,
    /// The store.
    #[arg(long, default_value = "lvm-sweep.db", value_name = "PATH")]
    db: PathBuf,
    /// Address to serve workers on; anything but loopback needs a token.
    #[arg(long, default_value = "127.0.0.1:50051", value_name = "ADDR")]
    listen: String,
    /// Start this many worker processes on this machine.
    #[arg(long, default_value_t = 0, value_name = "N",
        value_parser = clap::value_parser!(u32).range(0..=256))]
    local_workers: u32,
    /// Seconds a lease lasts without a heartbeat.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    lease_seconds: u64,
    /// Seconds after a lease's expiry before its attempt is declared lost.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    grace_seconds: u64,
    /// Failures of a trial itself before it ends as failed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_failures: u32,
    /// A file holding the shared token workers must present (default: $LVM_SWEEP_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key, workers connect with https://.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Dataset directory for local workers (default: theirs, $LVM_DATA_DIR or ./data).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Also write the final tables to this file (Markdown).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trial counts, running trials and recent failures, per sweep.
    Status {
        /// The store.
        #[arg(long, default_value = "lvm-sweep.db", value_name = "PATH")]
        db: PathBuf,
        /// Only this sweep.
        #[arg(long, value_name = "NAME")]
        sweep: Option<String>,
    },
    /// The paper-style tables of a sweep.
    Report {
        /// The store.
        #[arg(long, default_value = "lvm-sweep.db", value_name = "PATH")]
        db: PathBuf,
        /// The sweep (default: the one submitted last).
        #[arg(long, value_name = "NAME")]
        sweep: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Md)]
        format: Format,
        /// Write to this file instead of stdout.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
}

fn write_out(text: &str, out: Option<&PathBuf>) -> Result<()> {
    match out {
        Some(path) => {
            let tmp = path.with_extension("partial");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .with_context(|| format!("writing {}", path.display()))
        }
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn report(
    db: &std::path::Path,
    sweep: Option<String>,
    format: Format,
    out: Option<&PathBuf>,
) -> Result<()> {
    let store = Store::open_existing(db)?;
    let name = match sweep {
        Some(name) => {
            store.require_sweep(&name)?;
            name
        }
        None => store
            .sweeps()?
            .pop()
            .with_context(|| format!("no sweeps in {}", db.display()))?,
    };
    let report = Report::compute(&name, &store.trials(&name)?).map_err(anyhow::Error::msg)?;
    write_out(&report.render(format), out)
}

async fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Some(Command::Status { db, sweep }) => {
            let store = Store::open_existing(&db)?;
            print!("{}", coordinator::status::render(&store, sweep.as_slice())?);
            Ok(true)
        }
        Some(Command::Report {
            db,
            sweep,
            format,
            out,
        }) => report(&db, sweep, format, out.as_ref()).map(|()| true),
        None => {
            let args = cli.serve;
            let Some(sweep) = args.sweep else {
                anyhow::bail!(
                    "nothing to do: pass --sweep FILE to run a sweep, or a subcommand \
                     (status, report); see --help"
                );
            };
            let token =
                lvm_proto::load_token(args.token_file.as_deref()).map_err(anyhow::Error::msg)?;
            let options = ServeOptions {
                sweep,
                db: args.db,
                listen: args.listen,
                local_workers: args.local_workers,
                policy: Policy {
                    lease_ms: args.lease_seconds * 1000,
                    grace_ms: args.grace_seconds * 1000,
                    max_failures: args.max_failures,
                    ..Policy::default()
                },
                token,
                data_dir: args.data_dir,
                tls: args.tls_cert.zip(args.tls_key),
            };
            let served = serve(options).await?;
            let tables = served.report.render(Format::Md);
            print!("{tables}");
            if let Some(out) = &args.out {
                write_out(&tables, Some(out))?;
            }
            Ok(served.counts.failed == 0 && served.counts.pending + served.counts.running == 0)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("some trials failed; see `coordinator status`");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
