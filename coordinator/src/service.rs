//! The gRPC service workers pull from: a thin adapter that turns protocol messages into
//! scheduler events, persists each resulting transition in the store, and only then
//! answers. Everything that comes off the wire is validated here, once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use lvm_proto::v1::coordinator_server::Coordinator;
use lvm_proto::v1::{
    self, Ack, AttemptRef, EpochReport, FailureKind, FinishReport, HeartbeatRequest,
    HeartbeatResponse, LeaseRequest, LeaseResponse, RegisterRequest, RegisterResponse,
    finish_report, lease_response,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::scheduler::{Counts, LeaseDecision, Outcome, Rejection, Scheduler, Transition};
use crate::store::{Store, StoreError, WorkerRecord};

/// Longest accepted name (worker name, metric name, trial id).
const MAX_NAME: usize = 256;
/// Most metrics in one report.
const MAX_METRICS: usize = 64;
/// Longest error text kept.
const MAX_ERROR: usize = 16 << 10;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The scheduler and the store, changed together under one lock.
#[derive(Debug)]
pub struct State {
    /// The trials being served.
    pub scheduler: Scheduler,
    /// Where every change is persisted.
    pub store: Store,
    /// Workers told that the sweep is done.
    pub released: std::collections::BTreeSet<String>,
}

impl State {
    /// Persists transitions; a store failure is an internal error for the caller.
    fn persist(&mut self, transitions: &[Transition], now: u64) -> Result<(), StoreError> {
        for t in transitions {
            self.store.apply(t, now)?;
        }
        Ok(())
    }
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct Service {
    state: Arc<Mutex<State>>,
    counts: watch::Sender<Counts>,
}

fn internal(e: StoreError) -> Status {
    tracing::error!(error = %e, "store failure");
    Status::internal(format!("coordinator store failure: {e}"))
}

fn check_name(what: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() || value.len() > MAX_NAME || value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1-{MAX_NAME} printable characters, got {:?}",
            value.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

fn attempt_ref(r: Option<AttemptRef>) -> Result<(String, u32), Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("attempt is missing"))?;
    check_name("trial_id", &r.trial_id)?;
    if r.attempt == 0 {
        return Err(Status::invalid_argument("attempt must be at least 1"));
    }
    Ok((r.trial_id, r.attempt))
}

fn metrics(list: Vec<v1::Metric>) -> Result<BTreeMap<String, f64>, Status> {
    if list.len() > MAX_METRICS {
        return Err(Status::invalid_argument(format!(
            "{} metrics in one report; at most {MAX_METRICS}",
            list.len()
        )));
    }
    let mut out = BTreeMap::new();
    for m in list {
        check_name("metric name", &m.name)?;
        if !m.value.is_finite() {
            return Err(Status::invalid_argument(format!(
                "metric {} is {}; metrics must be finite",
                m.name, m.value
            )));
        }
        out.insert(m.name, m.value);
    }
    Ok(out)
}

fn ack(result: Result<(), Rejection>) -> Response<Ack> {
    Response::new(match result {
        Ok(()) => Ack {
            accepted: true,
            reason: String::new(),
        },
        Err(rejection) => {
            tracing::warn!(%rejection, "report rejected");
            Ack {
                accepted: false,
                reason: rejection.to_string(),
            }
        }
    })
}

impl Service {
    /// Serves `state`; `counts` receives the trial counts after every change.
    pub fn new(state: State, counts: watch::Sender<Counts>) -> Self {
        counts.send_replace(state.scheduler.counts());
        Self {
            state: Arc::new(Mutex::new(state)),
            counts,
        }
    }

    /// The shared state.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn publish(&self, state: &State) {
        self.counts.send_replace(state.scheduler.counts());
    }

    /// Declares lost the attempts whose leases ran out; called periodically.
    pub fn tick(&self, now: u64) -> Result<(), StoreError> {
        let mut state = self.state();
        let transitions = state.scheduler.expire(now);
        for t in &transitions {
            if let Transition::Ended { trial, attempt, .. } = t {
                tracing::warn!(trial, attempt, "attempt lost: lease expired");
            }
        }
        state.persist(&transitions, now)?;
        if !transitions.is_empty() {
            self.publish(&state);
        }
        Ok(())
    }

    fn known_worker(&self, state: &State, worker: &str) -> Result<(), Status> {
        check_name("worker_id", worker)?;
        match state.store.has_worker(worker) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Status::not_found(format!(
                "unknown worker {worker}: register first"
            ))),
            Err(e) => Err(internal(e)),
        }
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let req = request.into_inner();
        check_name("name", &req.name)?;
        let caps = req
            .capabilities
            .ok_or_else(|| Status::invalid_argument("capabilities are missing"))?;
        for (what, value) in [
            ("backend", &caps.backend),
            ("device", &caps.device),
            ("version", &caps.version),
        ] {
            check_name(what, value)?;
        }
        if !(1..=256).contains(&caps.slots) {
            return Err(Status::invalid_argument(format!(
                "slots must be 1-256, got {}",
                caps.slots
            )));
        }
        let id = format!("{}-{:08x}", req.name, rand::random::<u32>());
        let now = now_ms();
        let mut state = self.state();
        let record = WorkerRecord {
            id: id.clone(),
            name: req.name,
            backend: caps.backend,
            device: caps.device,
            slots: caps.slots,
            version: caps.version,
        };
        state
            .store
            .register_worker(&record, now)
            .map_err(internal)?;
        tracing::info!(worker = %id, slots = record.slots, "worker registered");
        let lease_s = state.scheduler.policy().lease_ms / 1000;
        Ok(Response::new(RegisterResponse {
            worker_id: id,
            heartbeat_seconds: (lease_s / 4).max(1) as u32,
        }))
    }

    async fn lease(
        &self,
        request: Request<LeaseRequest>,
    ) -> Result<Response<LeaseResponse>, Status> {
        let worker = request.into_inner().worker_id;
        let now = now_ms();
        let mut state = self.state();
        self.known_worker(&state, &worker)?;
        state.store.touch_worker(&worker, now).map_err(internal)?;
        let (decision, transition) = state.scheduler.lease(&worker, now);
        state
            .persist(transition.as_slice(), now)
            .map_err(internal)?;
        let outcome = match decision {
            LeaseDecision::Granted {
                trial,
                attempt,
                expires_ms,
            } => {
                let spec_json = state.store.spec_json(&trial).map_err(internal)?;
                let checkpoint = state.store.checkpoint(&trial).map_err(internal)?;
                tracing::info!(%worker, %trial, attempt, "leased");
                self.publish(&state);
                lease_response::Outcome::Lease(v1::Lease {
                    trial_id: trial,
                    attempt,
                    spec_json,
                    expires_unix_ms: expires_ms,
                    checkpoint: checkpoint.unwrap_or_default(),
                })
            }
            LeaseDecision::Wait(ms) => lease_response::Outcome::RetryAfterMs(ms),
            LeaseDecision::Done => {
                state.released.insert(worker);
                lease_response::Outcome::Done(true)
            }
        };
        Ok(Response::new(LeaseResponse {
            outcome: Some(outcome),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let now = now_ms();
        let mut state = self.state();
        self.known_worker(&state, &req.worker_id)?;
        state
            .store
            .touch_worker(&req.worker_id, now)
            .map_err(internal)?;
        let mut held = Vec::with_capacity(req.attempts.len());
        for a in req.attempts.into_iter().take(1024) {
            held.push(attempt_ref(Some(a))?);
        }
        let revoked = state.scheduler.heartbeat(&req.worker_id, &held, now);
        Ok(Response::new(HeartbeatResponse {
            revoked: revoked
                .into_iter()
                .map(|(trial_id, attempt)| AttemptRef { trial_id, attempt })
                .collect(),
        }))
    }

    async fn report_epoch(&self, request: Request<EpochReport>) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        let (trial, attempt) = attempt_ref(req.attempt)?;
        let values = metrics(req.metrics)?;
        let now = now_ms();
        let mut state = self.state();
        self.known_worker(&state, &req.worker_id)?;
        if let Err(rejection) = state.scheduler.renew(&req.worker_id, &trial, attempt, now) {
            return Ok(ack(Err(rejection)));
        }
        let checkpoint = (!req.checkpoint.is_empty()).then_some(req.checkpoint.as_slice());
        state
            .store
            .record_epoch(&trial, attempt, req.epoch, &values, checkpoint)
            .map_err(internal)?;
        Ok(ack(Ok(())))
    }

    async fn finish(&self, request: Request<FinishReport>) -> Result<Response<Ack>, Status> {
        let req = request.into_inner();
        let (trial, attempt) = attempt_ref(req.attempt)?;
        let outcome = match req.outcome {
            Some(finish_report::Outcome::Success(s)) => {
                if !s.wall_seconds.is_finite() || s.wall_seconds < 0.0 {
                    return Err(Status::invalid_argument(format!(
                        "wall_seconds must be finite and non-negative, got {}",
                        s.wall_seconds
                    )));
                }
                Outcome::Succeeded {
                    metrics: metrics(s.metrics)?,
                    wall_seconds: s.wall_seconds,
                }
            }
            Some(finish_report::Outcome::Failure(f)) => {
                let mut error = f.error;
                if error.len() > MAX_ERROR {
                    let mut cut = MAX_ERROR;
                    while !error.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    error.truncate(cut);
                }
                match FailureKind::try_from(f.kind) {
                    Ok(FailureKind::Trial) => Outcome::Failed(error),
                    Ok(FailureKind::Preempted) => Outcome::Preempted,
                    Ok(FailureKind::Invalid) => Outcome::Invalid(error),
                    _ => {
                        return Err(Status::invalid_argument(format!(
                            "failure kind {} is not one of trial, preempted, invalid",
                            f.kind
                        )));
                    }
                }
            }
            None => return Err(Status::invalid_argument("outcome is missing")),
        };
        let now = now_ms();
        let mut state = self.state();
        self.known_worker(&state, &req.worker_id)?;
        let result = state
            .scheduler
            .finish(&req.worker_id, &trial, attempt, outcome, now);
        match result {
            Ok(transition) => {
                state
                    .persist(std::slice::from_ref(&transition), now)
                    .map_err(internal)?;
                if let Transition::Ended { end, .. } = &transition {
                    tracing::info!(worker = %req.worker_id, %trial, attempt, end = end.name(),
                        "attempt ended");
                }
                self.publish(&state);
                Ok(ack(Ok(())))
            }
            Err(rejection) => Ok(ack(Err(rejection))),
        }
    }
}
