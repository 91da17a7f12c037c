//! `worker --coordinator URL`: register with a coordinator, pull trials, train them with
//! lvm-core, stream each epoch's metrics (with the checkpoint written at that epoch), and
//! report each attempt's outcome. The worker exits 0 when the coordinator says the sweep
//! is done, or after draining on SIGTERM.
//!
//! Every call to the coordinator is retried with exponential backoff while the coordinator
//! is unreachable, up to `--give-up-after` seconds, so a coordinator restart costs a worker
//! nothing. A report the coordinator rejects (the attempt is no longer current: the lease
//! expired and the trial went to another worker) stops the attempt and is logged; the
//! worker carries on with the next lease.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use lvm_core::checkpoint::CheckpointFile;
use lvm_core::data::DataDir;
use lvm_core::spec::TrialSpec;
use lvm_core::tasks::{Stage, TrainError};
use lvm_core::train::{Control, EpochReport, Observer, TrialOptions, TrialOutcome, run_trial};
use lvm_proto::v1::coordinator_client::CoordinatorClient;
use lvm_proto::v1::{
    self, AttemptRef, Capabilities, FailureKind, FinishReport, HeartbeatRequest, LeaseRequest,
    Metric, RegisterRequest, finish_report, lease_response,
};
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::spool::{self, Spooled};

/// Flags of `worker --coordinator`.
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// The coordinator's address, e.g. http://HOST:50051.
    #[arg(long, value_name = "URL")]
    pub coordinator: String,
    /// Trials to run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub slots: u32,
    /// Device to train on; this build trains on the CPU.
    #[arg(long, default_value = "cpu", value_parser = ["cpu"])]
    pub device: String,
    /// Dataset directory (default: $LVM_DATA_DIR, else ./data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Name shown by the coordinator (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// With an https:// URL: trust only this CA certificate (PEM) instead of the public roots.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// A file holding the coordinator's shared token (default: $LVM_SWEEP_TOKEN, if set).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Stop retrying an unreachable coordinator after this many seconds: finish the current
    /// trial, keep its reports in the spool and exit 1.
    #[arg(long, default_value_t = 300)]
    pub give_up_after: u64,
    /// Where undelivered reports are kept; a worker delivers what it finds here at start.
    #[arg(long, default_value = "lvm-worker-spool", value_name = "DIR")]
    pub spool_dir: PathBuf,
}

/// Adds the bearer token, if any, to every request.
#[derive(Debug, Clone)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// The client type.
pub type Client = CoordinatorClient<InterceptedService<Channel, Auth>>;

/// Connects (lazily: the first call dials, and later calls redial after a restart). An
/// https:// URL uses TLS, trusting `ca` (PEM) if given, else the public web roots.
pub fn client(url: &str, token: Option<&str>, ca: Option<&std::path::Path>) -> Result<Client> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("--coordinator {url:?} is not a URL like http://HOST:50051"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120));
    match (url.starts_with("https://"), ca) {
        (true, ca) => {
            let tls = tonic::transport::ClientTlsConfig::new();
            let tls = match ca {
                Some(path) => {
                    let pem = std::fs::read(path)
                        .with_context(|| format!("reading --ca-file {}", path.display()))?;
                    tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
                }
                None => tls.with_webpki_roots(),
            };
            endpoint = endpoint
                .tls_config(tls)
                .with_context(|| format!("setting up TLS for {url}"))?;
        }
        (false, Some(_)) => bail!("--ca-file needs an https:// coordinator URL, got {url}"),
        (false, None) => {}
    }
    let auth = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .context("the token must be printable ASCII")?,
        ),
        None => None,
    };
    Ok(
        CoordinatorClient::with_interceptor(endpoint.connect_lazy(), Auth(auth))
            .max_decoding_message_size(lvm_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(lvm_proto::MAX_MESSAGE_BYTES),
    )
}

/// Whether a call failed because the coordinator could not be reached (worth retrying).
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// Retries `call` with backoff while the coordinator is unreachable.
async fn retry<T, F, Fut>(what: &str, give_up: Duration, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut delay = Duration::from_millis(200);
    let mut since: Option<Instant> = None;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(status) if transient(&status) => {
                let first = *since.get_or_insert_with(Instant::now);
                if first.elapsed() >= give_up {
                    return Err(status);
                }
                tracing::warn!(what, error = %status.message(), "coordinator unreachable");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(status) => return Err(status),
        }
    }
}

/// What the training thread tells the async side.
enum Event {
    Epoch {
        epoch: u32,
        metrics: Vec<Metric>,
        checkpoint: Vec<u8>,
    },
}

/// Streams epochs to the async side and stops the trial when asked.
struct Streamer {
    tx: mpsc::UnboundedSender<Event>,
    stop: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    checkpoint: PathBuf,
    warm_start_epochs: u32,
}

impl Observer for Streamer {
    fn on_epoch(&mut self, r: &EpochReport) -> Control {
        let epoch = match r.stage {
            Stage::WarmStart => r.epoch as u32,
            Stage::Main => self.warm_start_epochs + r.epoch as u32,
        };
        let metric = |name: &str, value: f64| Metric {
            name: name.into(),
            value,
        };
        let metrics = vec![
            metric("objective", r.objective),
            metric("decoder_calls", r.decoder_calls),
            metric("steps", r.steps as f64),
            metric("seconds", r.seconds),
        ];
        let checkpoint = std::fs::read(&self.checkpoint).unwrap_or_default();
        let _ = self.tx.send(Event::Epoch {
            epoch,
            metrics,
            checkpoint,
        });
        if self.stop.load(Ordering::SeqCst) || self.draining.load(Ordering::SeqCst) {
            Control::Stop
        } else {
            Control::Continue
        }
    }
}

/// A registered worker.
struct Worker {
    client: Client,
    id: String,
    heartbeat: Duration,
    give_up: Duration,
    data: DataDir,
    /// Set by SIGTERM: take no new lease, stop running trials at their next epoch.
    draining: Arc<AtomicBool>,
    /// Where undelivered reports are kept.
    spool_dir: PathBuf,
}

/// How an attempt ended on this side.
enum Ended {
    Finished(v1::finish_report::Outcome),
    /// The coordinator no longer considers the attempt current: report nothing.
    Revoked,
}

impl Worker {
    async fn run_slot(&self, slot: u32) -> Result<()> {
        loop {
            if self.draining.load(Ordering::SeqCst) {
                return Ok(());
            }
            let mut client = self.client.clone();
            let id = self.id.clone();
            let response = retry("lease", self.give_up, || {
                let mut client = client.clone();
                let worker_id = id.clone();
                async move { client.lease(LeaseRequest { worker_id }).await }
            })
            .await
            .context("asking for a lease")?
            .into_inner();
            client = self.client.clone();
            match response.outcome {
                Some(lease_response::Outcome::Lease(lease)) => {
                    let trial = lease.trial_id.clone();
                    let attempt = lease.attempt;
                    let mut undelivered = Vec::new();
                    let ended = self.attempt(lease, &mut undelivered).await;
                    self.finish(&mut client, &trial, attempt, ended, undelivered)
                        .await?;
                }
                Some(lease_response::Outcome::RetryAfterMs(ms)) => {
                    tokio::time::sleep(Duration::from_millis(u64::from(ms).clamp(50, 60_000)))
                        .await;
                }
                Some(lease_response::Outcome::Done(_)) => {
                    tracing::info!(slot, "the coordinator says the sweep is done");
                    return Ok(());
                }
                None => bail!("the coordinator answered a lease request with nothing"),
            }
        }
    }

    async fn finish(
        &self,
        client: &mut Client,
        trial: &str,
        attempt: u32,
        ended: Ended,
        undelivered: Vec<v1::EpochReport>,
    ) -> Result<()> {
        let Ended::Finished(outcome) = ended else {
            return Ok(());
        };
        let report = FinishReport {
            worker_id: self.id.clone(),
            attempt: Some(AttemptRef {
                trial_id: trial.to_owned(),
                attempt,
            }),
            outcome: Some(outcome),
        };
        if !undelivered.is_empty() {
            return self.spool(trial, attempt, undelivered, report);
        }
        let sent = retry("finish", self.give_up, || {
            let mut client = client.clone();
            let report = report.clone();
            async move { client.finish(report).await }
        })
        .await;
        match sent {
            Ok(ack) => {
                let ack = ack.into_inner();
                if !ack.accepted {
                    let reason = ack.reason;
                    tracing::warn!(trial, attempt, %reason, "result rejected as stale");
                }
                Ok(())
            }
            Err(status) if transient(&status) => self.spool(trial, attempt, Vec::new(), report),
            Err(status) => Err(anyhow::anyhow!(status)).context("reporting a trial's outcome"),
        }
    }

    /// Keeps an attempt's undelivered reports on disk and gives up on the coordinator.
    fn spool(
        &self,
        trial: &str,
        attempt: u32,
        epochs: Vec<v1::EpochReport>,
        finish: FinishReport,
    ) -> Result<()> {
        let mut reports: Vec<Spooled> = epochs.into_iter().map(Spooled::Epoch).collect();
        reports.push(Spooled::Finish(finish));
        let path = spool::write(&self.spool_dir, trial, attempt, &reports)?;
        bail!(
            "the coordinator stayed unreachable for {} s; the result of trial {trial} attempt \
             {attempt} is kept in {} and is delivered by the next worker started with \
             --spool-dir {}",
            self.give_up.as_secs(),
            path.display(),
            self.spool_dir.display()
        )
    }

    /// Runs one leased attempt to its end.
    async fn attempt(&self, lease: v1::Lease, undelivered: &mut Vec<v1::EpochReport>) -> Ended {
        let invalid = |error: String| {
            Ended::Finished(finish_report::Outcome::Failure(v1::Failure {
                kind: FailureKind::Invalid as i32,
                error,
            }))
        };
        let spec: TrialSpec = match serde_json::from_str(&lease.spec_json) {
            Ok(spec) => spec,
            Err(e) => return invalid(format!("the trial spec is not valid JSON: {e}")),
        };
        if let Err(e) = spec.validate() {
            return invalid(e.to_string());
        }
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => return failure(format!("creating a checkpoint directory: {e}")),
        };
        let file = CheckpointFile::new(dir.path(), &spec);
        if !lease.checkpoint.is_empty()
            && let Err(e) = std::fs::write(file.path(), &lease.checkpoint)
        {
            return failure(format!("writing the leased checkpoint: {e}"));
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut streamer = Streamer {
            tx,
            stop: stop.clone(),
            draining: self.draining.clone(),
            checkpoint: file.path().to_owned(),
            warm_start_epochs: spec.hyper.warm_start_epochs.unwrap_or(0) as u32,
        };
        let options = TrialOptions {
            data: self.data.clone(),
            checkpoint_dir: Some(dir.path().to_owned()),
            game_features: None,
            device: Device::flex().autodiff(),
        };
        let span = tracing::info_span!("trial", id = %lease.trial_id, attempt = lease.attempt,
            task = %spec.task, estimator = %spec.estimator, seed = spec.seed);
        let started = Instant::now();
        let training = {
            let spec = spec.clone();
            let span = span.clone();
            tokio::task::spawn_blocking(move || {
                span.in_scope(|| run_trial(&spec, &options, &mut streamer))
            })
        };
        tokio::pin!(training);
        let attempt_ref = AttemptRef {
            trial_id: lease.trial_id.clone(),
            attempt: lease.attempt,
        };
        let mut beat = tokio::time::interval(self.heartbeat);
        let mut revoked = false;
        let joined = loop {
            tokio::select! {
                joined = &mut training => break joined,
                Some(event) = rx.recv() => {
                    if !self.send_epoch(&attempt_ref, event, undelivered).await {
                        revoked = true;
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                _ = beat.tick() => {
                    if self.draining.load(Ordering::SeqCst) {
                        stop.store(true, Ordering::SeqCst);
                    }
                    if !self.beat(&attempt_ref).await {
                        revoked = true;
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            }
        };
        // Epochs finished before the trial ended are delivered before its outcome.
        while let Ok(event) = rx.try_recv() {
            if !revoked && !self.send_epoch(&attempt_ref, event, undelivered).await {
                revoked = true;
            }
        }
        drop(dir);
        let _entered = span.enter();
        if revoked {
            tracing::warn!("attempt revoked by the coordinator; dropping it");
            return Ended::Revoked;
        }
        match joined {
            Ok(Ok(TrialOutcome::Finished(result))) => {
                tracing::info!(seconds = started.elapsed().as_secs_f64(), "trial finished");
                Ended::Finished(finish_report::Outcome::Success(v1::Success {
                    metrics: result
                        .metrics
                        .iter()
                        .map(|(name, value)| Metric {
                            name: name.clone(),
                            value: *value,
                        })
                        .collect(),
                    wall_seconds: started.elapsed().as_secs_f64(),
                }))
            }
            Ok(Ok(TrialOutcome::Stopped { epochs_done })) => {
                tracing::info!(
                    epochs_done,
                    "trial stopped to drain; releasing it as preempted"
                );
                Ended::Finished(finish_report::Outcome::Failure(v1::Failure {
                    kind: FailureKind::Preempted as i32,
                    error: format!("worker drained after {epochs_done} epochs"),
                }))
            }
            Ok(Err(TrainError::Spec(e))) => invalid(e.to_string()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "trial failed");
                failure(crate::one_line(&anyhow::Error::new(e)))
            }
            Err(join) => failure(format!("the trial panicked: {join}")),
        }
    }

    /// Sends one epoch; false when the coordinator rejected it as stale. Once the coordinator
    /// has stayed unreachable past the give-up limit, epochs go to `undelivered` unsent.
    async fn send_epoch(
        &self,
        attempt: &AttemptRef,
        event: Event,
        undelivered: &mut Vec<v1::EpochReport>,
    ) -> bool {
        let Event::Epoch {
            epoch,
            metrics,
            checkpoint,
        } = event;
        let report = v1::EpochReport {
            worker_id: self.id.clone(),
            attempt: Some(attempt.clone()),
            epoch,
            metrics,
            checkpoint,
        };
        if !undelivered.is_empty() {
            undelivered.push(report);
            return true;
        }
        let client = self.client.clone();
        let sent = retry("epoch report", self.give_up, || {
            let mut client = client.clone();
            let report = report.clone();
            async move { client.report_epoch(report).await }
        })
        .await;
        match sent {
            Ok(ack) if ack.get_ref().accepted => true,
            Ok(ack) => {
                tracing::warn!(reason = %ack.get_ref().reason, "epoch report rejected as stale");
                false
            }
            Err(status) if transient(&status) => {
                tracing::warn!(error = %status, "coordinator gone; keeping epoch reports");
                undelivered.push(report);
                true
            }
            Err(status) => {
                tracing::warn!(error = %status, "epoch report refused");
                true
            }
        }
    }

    /// Delivers the reports spooled by an earlier run, each file in order, and deletes each
    /// file once all its reports were answered. A corrupt file is renamed aside.
    async fn deliver_spool(&self) -> Result<()> {
        for path in spool::pending(&self.spool_dir)? {
            let reports = match spool::read(&path) {
                Ok(reports) => reports,
                Err(e) => {
                    tracing::error!(error = %e, "unreadable spool file; moved aside");
                    let _ = std::fs::rename(&path, path.with_extension("spool.corrupt"));
                    continue;
                }
            };
            for report in reports {
                let client = self.client.clone();
                let ack = match report {
                    Spooled::Epoch(r) => {
                        retry("spooled epoch", self.give_up, || {
                            let mut client = client.clone();
                            let r = r.clone();
                            async move { client.report_epoch(r).await }
                        })
                        .await
                    }
                    Spooled::Finish(r) => {
                        retry("spooled finish", self.give_up, || {
                            let mut client = client.clone();
                            let r = r.clone();
                            async move { client.finish(r).await }
                        })
                        .await
                    }
                };
                match ack {
                    Ok(ack) if !ack.get_ref().accepted => {
                        tracing::warn!(reason = %ack.get_ref().reason, "spooled report stale");
                    }
                    Ok(_) => {}
                    Err(status) if transient(&status) => {
                        return Err(anyhow::anyhow!(status))
                            .context("delivering the spool: the coordinator is unreachable");
                    }
                    Err(status) => tracing::warn!(error = %status, "spooled report refused"),
                }
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("removing delivered spool {}", path.display()))?;
            eprintln!("delivered spooled reports from {}", path.display());
        }
        Ok(())
    }

    /// Renews the lease; false when the coordinator says the attempt is no longer ours.
    async fn beat(&self, attempt: &AttemptRef) -> bool {
        let mut client = self.client.clone();
        let request = HeartbeatRequest {
            worker_id: self.id.clone(),
            attempts: vec![attempt.clone()],
        };
        match client.heartbeat(request).await {
            Ok(response) => response.get_ref().revoked.is_empty(),
            Err(status) => {
                tracing::warn!(error = %status, "heartbeat not delivered");
                true
            }
        }
    }
}

fn failure(error: String) -> Ended {
    Ended::Finished(finish_report::Outcome::Failure(v1::Failure {
        kind: FailureKind::Trial as i32,
        error,
    }))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}

/// Registers, pulls and runs trials until the coordinator says the sweep is done.
pub async fn run(args: RemoteArgs) -> Result<()> {
    let token = lvm_proto::load_token(args.token_file.as_deref()).map_err(anyhow::Error::msg)?;
    let mut client = client(&args.coordinator, token.as_deref(), args.ca_file.as_deref())?;
    let give_up = Duration::from_secs(args.give_up_after);
    let name = args.name.clone().unwrap_or_else(host_name);
    let request = RegisterRequest {
        name: name.clone(),
        capabilities: Some(Capabilities {
            backend: "flex".into(),
            device: args.device.clone(),
            slots: args.slots,
            version: env!("CARGO_PKG_VERSION").into(),
        }),
    };
    let registered = retry("register", give_up, || {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.register(request).await }
    })
    .await
    .with_context(|| format!("registering with the coordinator at {}", args.coordinator))?
    .into_inner();
    client = client.clone();
    tracing::info!(id = %registered.worker_id, "registered");
    eprintln!(
        "worker {} registered with {}",
        registered.worker_id, args.coordinator
    );

    let draining = Arc::new(AtomicBool::new(false));
    {
        let draining = draining.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::spawn(async move {
            term.recv().await;
            eprintln!("SIGTERM: draining (checkpoint at the next epoch, then exit)");
            draining.store(true, Ordering::SeqCst);
        });
    }
    let worker = Arc::new(Worker {
        client,
        id: registered.worker_id,
        heartbeat: Duration::from_secs(u64::from(registered.heartbeat_seconds.clamp(1, 600))),
        give_up,
        data: DataDir::resolve(args.data_dir.clone()),
        draining,
        spool_dir: args.spool_dir.clone(),
    });
    worker.deliver_spool().await?;
    let mut slots = tokio::task::JoinSet::new();
    for slot in 0..args.slots {
        let worker = worker.clone();
        slots.spawn(async move { worker.run_slot(slot).await });
    }
    let mut result = Ok(());
    while let Some(joined) = slots.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(anyhow::anyhow!("a worker slot panicked: {e}")),
        }
    }
    result
}
