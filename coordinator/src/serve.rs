//! `coordinator --sweep FILE`: submit the sweep to the store (idempotently), serve workers
//! until every trial has finished, show progress on stderr, and return the report. With
//! `--local-workers N` the coordinator also starts N `worker` processes of its own.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lvm_proto::MAX_MESSAGE_BYTES;
use lvm_proto::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::auth::TokenCheck;
use crate::report::Report;
use crate::scheduler::{Counts, Policy, Scheduler};
use crate::service::{self, Service, State, now_ms};
use crate::store::Store;
use crate::sweep::Sweep;

/// What `coordinator --sweep` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The sweep file.
    pub sweep: PathBuf,
    /// The store.
    pub db: PathBuf,
    /// The address to listen on.
    pub listen: String,
    /// Workers to start on this machine.
    pub local_workers: u32,
    /// Timing and retry rules.
    pub policy: Policy,
    /// The shared token, required off loopback.
    pub token: Option<String>,
    /// Passed to local workers.
    pub data_dir: Option<PathBuf>,
    /// TLS certificate chain and private key (PEM files); plain HTTP/2 when `None`.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// How a served sweep ended.
#[derive(Debug)]
pub struct Served {
    /// The sweep's report.
    pub report: Report,
    /// Trial counts at the end.
    pub counts: Counts,
}

/// The `worker` binary beside this one.
fn worker_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating the coordinator binary")?;
    let path = me.with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        bail!(
            "--local-workers needs the worker binary at {}; build it with `cargo build --release`",
            path.display()
        );
    }
    Ok(path)
}

fn progress_bar(total: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} trials finished, {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

fn describe(counts: &Counts, started: Instant, done_at_start: usize) -> String {
    let finished = counts.succeeded + counts.failed;
    let this_run = finished.saturating_sub(done_at_start);
    let left = counts.pending + counts.running;
    let eta = if this_run > 0 && left > 0 {
        let per = started.elapsed().as_secs_f64() / this_run as f64;
        format!(", eta {}", format_duration(per * left as f64))
    } else {
        String::new()
    };
    format!(
        "{} succeeded, {} running, {} failed, {} pending{eta}",
        counts.succeeded, counts.running, counts.failed, counts.pending
    )
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Serves the sweep to completion.
pub async fn serve(options: ServeOptions) -> Result<Served> {
    let sweep = Sweep::load(&options.sweep)?;
    let addr: SocketAddr = options.listen.parse().with_context(|| {
        format!(
            "--listen {:?} is not an address like 127.0.0.1:50051",
            options.listen
        )
    })?;
    if !addr.ip().is_loopback() && options.token.is_none() {
        bail!(
            "--listen {addr} is reachable from other machines: give a shared token with \
             --token-file FILE or $LVM_SWEEP_TOKEN (workers pass the same)"
        );
    }
    if options.tls.is_some() && options.local_workers > 0 {
        bail!(
            "--local-workers cannot be combined with --tls-cert: start the workers yourself \
             with `worker --coordinator https://HOST:PORT --ca-file CA`"
        );
    }
    let tls = match &options.tls {
        Some((cert, key)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).with_context(|| format!("reading TLS file {}", p.display()))
            };
            Some(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ))
        }
        None => None,
    };
    let mut store = Store::open(&options.db)?;
    let file = options.sweep.display().to_string();
    let added = store.submit(&sweep, &file, now_ms())?;
    eprintln!(
        "sweep {}: {} trials ({added} new) in {}",
        sweep.name,
        sweep.trials.len(),
        options.db.display()
    );
    let mut scheduler = Scheduler::new(options.policy);
    let now = now_ms();
    for (id, entry) in store.entries(&sweep.name)? {
        scheduler.add(&id, entry, now);
    }
    if !scheduler.is_done() {
        run_until_done(&options, tls, scheduler, store).await?;
    }
    let store = Store::open(&options.db)?;
    let trials = store.trials(&sweep.name)?;
    let report = Report::compute(&sweep.name, &trials).map_err(anyhow::Error::msg)?;
    let mut counts = Counts::default();
    for t in &trials {
        match t.state.as_str() {
            "succeeded" => counts.succeeded += 1,
            "failed" => counts.failed += 1,
            "running" => counts.running += 1,
            _ => counts.pending += 1,
        }
    }
    Ok(Served { report, counts })
}

async fn run_until_done(
    options: &ServeOptions,
    tls: Option<tonic::transport::Identity>,
    scheduler: Scheduler,
    store: Store,
) -> Result<()> {
    let listener = TcpListener::bind(&options.listen)
        .await
        .with_context(|| format!("listening on {}", options.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    eprintln!("coordinator listening on {addr}");

    let total = scheduler.counts().total();
    let done_at_start = {
        let c = scheduler.counts();
        c.succeeded + c.failed
    };
    let (counts_tx, mut counts_rx) = watch::channel(Counts::default());
    let state = State {
        scheduler,
        store,
        released: Default::default(),
    };
    let service = Service::new(state, counts_tx);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let grpc = tonic::service::interceptor::InterceptedService::new(
        CoordinatorServer::new(service.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        TokenCheck::new(options.token.clone()),
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = tls {
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .context("the TLS certificate or key is unusable")?;
    }
    let server = tokio::spawn(builder.add_service(grpc).serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        },
    ));
    let ticker = {
        let service = service.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            loop {
                every.tick().await;
                if let Err(e) = service.tick(service::now_ms()) {
                    tracing::error!(error = %e, "expiring leases");
                }
            }
        })
    };

    let mut children = Vec::new();
    if options.local_workers > 0 {
        let binary = worker_binary()?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / options.local_workers as usize).max(1);
        for i in 0..options.local_workers {
            let mut command = tokio::process::Command::new(&binary);
            command
                .arg("--coordinator")
                .arg(format!("http://{addr}"))
                .arg("--name")
                .arg(format!("local-{}", i + 1))
                .env("RAYON_NUM_THREADS", threads.to_string())
                .stdin(Stdio::null())
                .kill_on_drop(true);
            if let Some(dir) = &options.data_dir {
                command.arg("--data-dir").arg(dir);
            }
            if let Some(token) = &options.token {
                command.env(lvm_proto::TOKEN_ENV, token);
            }
            children.push(command.spawn().with_context(|| {
                format!("starting local worker {} ({})", i + 1, binary.display())
            })?);
        }
        eprintln!("started {} local workers", options.local_workers);
    }

    let started = Instant::now();
    let bar = progress_bar(total);
    let mut last_counts = Counts {
        pending: usize::MAX,
        ..Counts::default()
    };
    let mut last_print = Instant::now();
    let mut interrupted = false;
    loop {
        let counts = *counts_rx.borrow_and_update();
        let line = describe(&counts, started, done_at_start);
        bar.set_position((counts.succeeded + counts.failed) as u64);
        bar.set_message(line.clone());
        // Without a terminal: a line when the counts change, and every 30 s regardless.
        if bar.is_hidden()
            && (counts != last_counts || last_print.elapsed() >= Duration::from_secs(30))
        {
            eprintln!("sweep: {line}");
            last_print = Instant::now();
            last_counts = counts;
        }
        if counts.pending + counts.running == 0 {
            break;
        }
        tokio::select! {
            _ = counts_rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => {
                interrupted = true;
                break;
            }
        }
    }
    bar.finish_and_clear();
    if !interrupted {
        eprintln!(
            "sweep: {}",
            describe(&service.state().scheduler.counts(), started, 0)
        );
    }

    // Let workers hear that the sweep is done before the port closes: local workers until
    // they exit, remote ones for a few lease polls.
    let linger = Duration::from_millis(3 * u64::from(options.policy.retry_after_ms) + 500);
    if interrupted {
        for child in &children {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30).max(linger);
    for child in &mut children {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, child.wait()).await {
            Ok(Ok(status)) if !status.success() => {
                eprintln!("a local worker exited with {status}");
            }
            Ok(_) => {}
            Err(_) => {
                eprintln!("a local worker did not exit; stopping it");
                let _ = child.kill().await;
            }
        }
    }
    if children.is_empty() && !interrupted {
        tokio::time::sleep(linger).await;
    }
    ticker.abort();
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Ok(()))) | Err(_) => {}
        Ok(Ok(Err(e))) => return Err(e).context("serving workers"),
        Ok(Err(e)) => return Err(e).context("the server task"),
    }
    if interrupted {
        bail!(
            "interrupted; the sweep is saved in {} and resumes with the same command",
            options.db.display()
        );
    }
    Ok(())
}
