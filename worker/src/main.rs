//! The `worker` command line: `worker --coordinator URL` pulls trials from a coordinator
//! until the sweep is done; `worker run` trains one trial locally.

use clap::{Parser, Subcommand};

use worker::local::RunArgs;
use worker::remote::RemoteArgs;

/// Train discrete latent-variable models with lvm-sweep.
#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    remote: Option<RemoteArgs>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train and evaluate one trial, printing per-epoch metrics.
    Run(RunArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match (cli.command, cli.remote) {
        (Some(Command::Run(args)), _) => worker::local::run(&args),
        (None, Some(args)) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(worker::remote::run(args))),
        (None, None) => Err(anyhow::anyhow!(
            "nothing to do: pass --coordinator URL to pull trials, or `run` to train one \
             (see --help)"
        )),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", worker::one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
