//! Many workers at once against the real service on 127.0.0.1, in one process: simulated
//! workers speak the gRPC protocol and "train" by sleeping a moment, so that scheduling,
//! fencing and the store are what is tested. N workers asking at the same instant get N
//! distinct trials; 10,000 trials served to 50 workers, a few of them killed while holding
//! a lease, end with every trial succeeded exactly once and every surviving worker released.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use coordinator::scheduler::Policy;
use coordinator::serve::{ServeOptions, Served, serve};
use coordinator::store::Store;
use lvm_proto::v1::coordinator_client::CoordinatorClient;
use lvm_proto::v1::{
    AttemptRef, Capabilities, FinishReport, Lease, LeaseRequest, Metric, RegisterRequest, Success,
    finish_report, lease_response,
};
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

fn sweep_of(dir: &Path, seeds: usize) -> std::path::PathBuf {
    let list: Vec<String> = (1..=seeds).map(|s| s.to_string()).collect();
    let path = dir.join("storm.yaml");
    let text = format!(
        "name: storm\nexperiments:\n  - task: ssvae\n    seeds: [{}]\n    \
         estimators: {{sfe: {{}}}}\n",
        list.join(", ")
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn options(dir: &Path, seeds: usize, port: u16) -> ServeOptions {
    ServeOptions {
        sweep: sweep_of(dir, seeds),
        db: dir.join("storm.db"),
        listen: format!("127.0.0.1:{port}"),
        local_workers: 0,
        policy: Policy {
            lease_ms: 1000,
            grace_ms: 200,
            max_failures: 3,
            max_lost: 5,
            retry_after_ms: 50,
        },
        token: None,
        data_dir: None,
        tls: None,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects and registers, retrying until the server is up.
async fn register(port: u16, name: &str) -> (CoordinatorClient<Channel>, String) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    let mut client = CoordinatorClient::new(channel);
    for _ in 0..200 {
        let request = RegisterRequest {
            name: name.into(),
            capabilities: Some(Capabilities {
                backend: "sim".into(),
                device: "cpu".into(),
                slots: 1,
                version: "0".into(),
            }),
        };
        if let Ok(r) = client.register(request).await {
            return (client, r.into_inner().worker_id);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the coordinator never came up");
}

/// Waits for the served sweep to end (it ends once every trial has finished).
async fn served(server: tokio::task::JoinHandle<anyhow::Result<Served>>) -> Served {
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("the sweep ends")
        .expect("the serving task")
        .expect("serving succeeds")
}

/// Asks for a trial and expects one.
async fn lease(client: &mut CoordinatorClient<Channel>, worker: &str) -> Lease {
    let answer = client
        .lease(LeaseRequest {
            worker_id: worker.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    match answer.outcome {
        Some(lease_response::Outcome::Lease(lease)) => lease,
        other => panic!("worker {worker} got no lease: {other:?}"),
    }
}

fn success(worker: &str, trial: String, attempt: u32) -> FinishReport {
    let metric = |name: &str, value| Metric {
        name: name.into(),
        value,
    };
    FinishReport {
        worker_id: worker.into(),
        attempt: Some(AttemptRef {
            trial_id: trial,
            attempt,
        }),
        outcome: Some(finish_report::Outcome::Success(Success {
            metrics: vec![
                metric("test_accuracy", 0.5),
                metric("test_neg_elbo", 100.0),
                metric("decoder_calls", 1.0),
            ],
            wall_seconds: 0.001,
        })),
    }
}

/// Leases and "trains" until told the sweep is done, or until its `dies_at`-th lease,
/// which it keeps without ever reporting (a SIGKILL). Returns the trials it finished.
async fn simulated_worker(port: u16, name: String, dies_at: Option<usize>, seed: u64) -> usize {
    let (mut client, id) = register(port, &name).await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut leases = 0;
    let mut finished = 0;
    loop {
        let answer = client
            .lease(LeaseRequest {
                worker_id: id.clone(),
            })
            .await
            .expect("lease")
            .into_inner();
        match answer.outcome.expect("an outcome") {
            lease_response::Outcome::Lease(lease) => {
                leases += 1;
                if Some(leases) == dies_at {
                    return finished;
                }
                tokio::time::sleep(Duration::from_micros(rng.random_range(0..2000))).await;
                let ack = client
                    .finish(success(&id, lease.trial_id, lease.attempt))
                    .await
                    .expect("finish")
                    .into_inner();
                assert!(ack.accepted, "{}", ack.reason);
                finished += 1;
            }
            lease_response::Outcome::RetryAfterMs(ms) => {
                tokio::time::sleep(Duration::from_millis(ms.into())).await;
            }
            lease_response::Outcome::Done(_) => return finished,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_asking_at_the_same_instant_get_distinct_trials() {
    const N: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = tokio::spawn(serve(options(dir.path(), N, port)));
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::new();
    for i in 0..N {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let (mut client, id) = register(port, &format!("w{i}")).await;
            barrier.wait().await;
            let lease = lease(&mut client, &id).await;
            let trial = lease.trial_id.clone();
            client
                .finish(success(&id, lease.trial_id, lease.attempt))
                .await
                .unwrap();
            trial
        }));
    }
    let mut trials = std::collections::BTreeSet::new();
    for t in tasks {
        trials.insert(t.await.unwrap());
    }
    assert_eq!(trials.len(), N, "each worker got a trial of its own");
    let served = served(server).await;
    assert_eq!(served.counts.succeeded, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_trials_on_fifty_workers_with_some_killed_each_succeed_once() {
    const TRIALS: usize = 10_000;
    const WORKERS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = tokio::spawn(serve(options(dir.path(), TRIALS, port)));
    // 5% of the workers die, each at a random lease.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2020);
    let doomed: BTreeMap<usize, usize> = (0..WORKERS.div_ceil(20))
        .map(|_| (rng.random_range(0..WORKERS), rng.random_range(1..150)))
        .collect();
    let mut tasks = Vec::new();
    for i in 0..WORKERS {
        let dies_at = doomed.get(&i).copied();
        tasks.push(tokio::spawn(simulated_worker(
            port,
            format!("sim{i}"),
            dies_at,
            i as u64,
        )));
    }
    let mut finished = 0;
    for t in tasks {
        finished += tokio::time::timeout(Duration::from_secs(600), t)
            .await
            .expect("every worker exits")
            .unwrap();
    }
    assert_eq!(finished, TRIALS, "accepted successes, all workers together");
    let served = served(server).await;
    assert_eq!(served.counts.succeeded, TRIALS);
    let store = Store::open(&dir.path().join("storm.db")).unwrap();
    let mut successes: BTreeMap<String, usize> = BTreeMap::new();
    let mut lost = 0;
    for a in store.attempts("storm").unwrap() {
        match a.outcome.as_deref() {
            Some("succeeded") => *successes.entry(a.trial).or_default() += 1,
            Some("lost") => lost += 1,
            other => panic!("unexpected attempt outcome {other:?}"),
        }
    }
    assert_eq!(successes.len(), TRIALS);
    assert!(successes.values().all(|&n| n == 1));
    assert_eq!(lost, doomed.len(), "one lost attempt per killed worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_and_the_service_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = tokio::spawn(serve(options(dir.path(), 1, port)));
    let (client, id) = register(port, "big").await;
    let mut client = client.max_encoding_message_size(usize::MAX);
    let lease = lease(&mut client, &id).await;
    // One byte over the 64 MiB limit.
    let report = lvm_proto::v1::EpochReport {
        worker_id: id.clone(),
        attempt: Some(AttemptRef {
            trial_id: lease.trial_id.clone(),
            attempt: lease.attempt,
        }),
        epoch: 0,
        metrics: vec![],
        checkpoint: vec![0; lvm_proto::MAX_MESSAGE_BYTES + 1],
    };
    let refused = client.report_epoch(report).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused}");
    let store = Store::open(&dir.path().join("storm.db")).unwrap();
    assert!(store.checkpoint(&lease.trial_id).unwrap().is_none());
    drop(store);
    // The same connection still works.
    let ack = client
        .finish(success(&id, lease.trial_id, lease.attempt))
        .await
        .unwrap()
        .into_inner();
    assert!(ack.accepted);
    let served = served(server).await;
    assert_eq!(served.counts.succeeded, 1);
}
