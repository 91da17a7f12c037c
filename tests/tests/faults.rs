//! Faults a sweep must survive, with the real binaries over loopback (the scenarios of
//! `docs/reliability.md`): dead workers, a network partition, a coordinator that goes away
//! (briefly, or for good), preemption by SIGTERM, a trial that always fails, intruders and
//! garbage on the port.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use coordinator::store::Store;
use lvm_sweep_tests::harness::{
    Proc, Proxy, binaries, data_dir, free_port, serve, status, sweep_file, worker, worker_spooling,
};

/// A 2 s lease with 1 s of grace, so that losses happen within a test.
const SHORT_LEASE: [&str; 4] = ["--lease-seconds", "2", "--grace-seconds", "1"];

/// Polls the store until `ready` holds for the sweep's first trial.
fn wait_until(
    db: &Path,
    sweep: &str,
    what: &str,
    ready: impl Fn(&coordinator::store::StoredTrial) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(trials) = Store::open(db).and_then(|s| s.trials(sweep))
            && trials.first().is_some_and(&ready)
        {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (attempt, worker name, outcome) of every attempt of the sweep's trials.
fn attempts(db: &Path, sweep: &str) -> Vec<(u32, String, String)> {
    Store::open(db)
        .unwrap()
        .attempts(sweep)
        .unwrap()
        .into_iter()
        .map(|a| {
            let who = a
                .worker
                .rsplit_once('-')
                .map_or(a.worker.clone(), |(n, _)| n.to_owned());
            (
                a.attempt,
                who,
                a.outcome.unwrap_or_else(|| "running".into()),
            )
        })
        .collect()
}

fn own(list: &[(u32, &str, &str)]) -> Vec<(u32, String, String)> {
    list.iter()
        .map(|(a, w, o)| (*a, w.to_string(), o.to_string()))
        .collect()
}

/// A one-trial signalling-game sweep of `epochs` epochs served on a fixed port, so that a
/// restarted coordinator is found where the workers expect it.
struct FixedPort {
    dir: tempfile::TempDir,
    db: std::path::PathBuf,
    port: u16,
    args: Vec<String>,
}

impl FixedPort {
    fn new(name: &str, epochs: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let defaults = format!("{{epochs: {epochs}, test_limit: 16}}");
        let sweep = sweep_file(
            dir.path(),
            name,
            &defaults,
            "signal_game",
            "{sfe: {batch_size: 16}}",
        );
        let db = dir.path().join("sweep.db");
        let port = free_port();
        let args = vec![
            "--sweep".into(),
            sweep.display().to_string(),
            "--db".into(),
            db.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        Self {
            dir,
            db,
            port,
            args,
        }
    }

    /// Starts the coordinator and waits until it listens.
    fn start(&self) -> Proc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut coordinator = Proc::spawn(lvm_sweep_tests::harness::coordinator(&args));
        coordinator.wait_for_line("listening on", Duration::from_secs(60));
        coordinator
    }
}

/// A worker SIGKILLed at `kill_when`: its attempt is lost once the lease (2 s) and grace
/// (1 s) have passed, `coordinator status` stops showing it running by then, and the trial
/// is leased exactly once more and finishes on another worker.
fn dead_worker(mid_trial: bool) {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(
        dir.path(),
        "dead",
        "{epochs: 2, test_limit: 16}",
        "signal_game",
        "{sfe: {batch_size: 16}}",
    );
    let db = dir.path().join("sweep.db");
    let (mut coord, port) = serve(&sweep, &db, &SHORT_LEASE);
    let mut doomed = Proc::spawn(worker(port, &["--name", "doomed"]));
    if mid_trial {
        wait_until(&db, "dead", "the first epoch is reported", |t| {
            t.epochs >= 1
        });
    } else {
        wait_until(&db, "dead", "the trial is leased", |t| t.state == "running");
    }
    doomed.kill();
    let killed = Instant::now();
    let mut rescuer = Proc::spawn(worker(port, &["--name", "rescuer"]));
    // `status` shows the dead worker's attempt running until expiry plus grace, never after.
    let mut last_shown = Duration::ZERO;
    while killed.elapsed() < Duration::from_secs(8) {
        let shown = status(&db);
        if shown
            .lines()
            .any(|l| l.trim_start().starts_with("running") && l.contains("worker doomed-"))
        {
            last_shown = killed.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        last_shown <= Duration::from_millis(3000 + 1500),
        "status showed the dead worker running {last_shown:?} after the kill"
    );
    assert!(
        coord.wait(Duration::from_secs(600)).success(),
        "{}",
        coord.seen.join("\n")
    );
    assert!(rescuer.wait(Duration::from_secs(60)).success());
    assert_eq!(
        attempts(&db, "dead"),
        own(&[(1, "doomed", "lost"), (2, "rescuer", "succeeded")])
    );
    if mid_trial {
        // The rescuer resumed from the checkpoint of epoch 1: it reported only epoch 2.
        let store = Store::open(&db).unwrap();
        let trial = &store.trials("dead").unwrap()[0];
        assert_eq!(store.epochs(&trial.id, 2).unwrap(), [1]);
    }
}

#[test]
fn a_worker_killed_right_after_its_lease_loses_it_after_expiry_and_grace() {
    dead_worker(false);
}

#[test]
fn a_worker_killed_mid_trial_loses_its_lease_and_the_trial_resumes_elsewhere() {
    dead_worker(true);
}

#[test]
fn a_partitioned_worker_has_its_stale_report_rejected_and_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(
        dir.path(),
        "split",
        "{epochs: 1, steps: 80, test_limit: 16}",
        "signal_game",
        "{sfe: {batch_size: 16}}",
    );
    let db = dir.path().join("sweep.db");
    let (mut coord, port) = serve(&sweep, &db, &SHORT_LEASE);
    let proxy = Proxy::start(port);
    let mut cut_off = Proc::spawn(worker(proxy.port, &["--name", "cutoff"]));
    wait_until(&db, "split", "the trial is leased", |t| {
        t.state == "running"
    });
    // Let the lease's answer reach the worker before the cut.
    std::thread::sleep(Duration::from_secs(1));
    proxy.cut();
    // The cut-off worker finishes training and cannot deliver its epoch report.
    cut_off.wait_for_line("epoch report", Duration::from_secs(300));
    wait_until(&db, "split", "the lease is lost", |t| t.state == "pending");
    let mut other = Proc::spawn(worker(port, &["--name", "other"]));
    wait_until(&db, "split", "the trial is leased again", |t| {
        t.attempts == 2
    });
    proxy.heal();
    cut_off.wait_for_line("rejected as stale", Duration::from_secs(60));
    assert!(coord.wait(Duration::from_secs(600)).success());
    assert!(other.wait(Duration::from_secs(60)).success());
    assert!(
        cut_off.wait(Duration::from_secs(60)).success(),
        "it carries on and exits 0"
    );
    assert_eq!(
        attempts(&db, "split"),
        own(&[(1, "cutoff", "lost"), (2, "other", "succeeded")])
    );
    let store = Store::open(&db).unwrap();
    let trial = &store.trials("split").unwrap()[0];
    assert!(
        store.epochs(&trial.id, 1).unwrap().is_empty(),
        "the stale epoch was not stored"
    );
}

#[test]
fn a_coordinator_down_mid_trial_gets_the_spooled_metrics_and_the_result_once() {
    let fixed = FixedPort::new("outage", 3);
    let (db, port) = (&fixed.db, fixed.port);
    let first = &mut fixed.start();
    let mut w = Proc::spawn(worker(port, &["--name", "steady"]));
    wait_until(db, "outage", "the first epoch is reported", |t| {
        t.epochs >= 1
    });
    first.kill();
    // Epoch 2 ends while the coordinator is away; the worker keeps it.
    w.wait_for_line("epoch report", Duration::from_secs(300));
    let mut second = fixed.start();
    assert!(
        second.wait(Duration::from_secs(600)).success(),
        "{}",
        second.seen.join("\n")
    );
    assert!(
        w.wait(Duration::from_secs(60)).success(),
        "the same worker process finished"
    );
    assert_eq!(attempts(db, "outage"), own(&[(1, "steady", "succeeded")]));
    let store = Store::open(db).unwrap();
    let trial = &store.trials("outage").unwrap()[0];
    assert_eq!(
        store.epochs(&trial.id, 1).unwrap(),
        [0, 1, 2],
        "every epoch, once"
    );
}

#[test]
fn a_worker_whose_coordinator_stays_away_spools_its_result_for_the_next_worker() {
    let fixed = FixedPort::new("gone", 2);
    let (db, port) = (&fixed.db, fixed.port);
    let spool = fixed.dir.path().join("spool");
    let first = &mut fixed.start();
    let mut w = Proc::spawn(worker_spooling(
        port,
        &spool,
        &["--name", "patient", "--give-up-after", "2"],
    ));
    wait_until(db, "gone", "the first epoch is reported", |t| t.epochs >= 1);
    first.kill();
    // The worker finishes the trial, keeps its result and exits 1, naming the spool.
    let status = w.wait(Duration::from_secs(300));
    assert!(!status.success());
    assert!(
        w.seen.iter().any(|l| l.contains("--spool-dir")),
        "{}",
        w.seen.join("\n")
    );
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 1);
    // Later: the coordinator is back, and a new worker on the same spool delivers it.
    let mut second = fixed.start();
    let mut next = Proc::spawn(worker_spooling(port, &spool, &["--name", "next"]));
    assert!(
        second.wait(Duration::from_secs(600)).success(),
        "{}",
        second.seen.join("\n")
    );
    assert!(next.wait(Duration::from_secs(60)).success());
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "the spool was emptied"
    );
    assert_eq!(
        attempts(db, "gone"),
        own(&[(1, "patient", "succeeded")]),
        "not rerun"
    );
    let store = Store::open(db).unwrap();
    let trial = &store.trials("gone").unwrap()[0];
    assert_eq!(store.epochs(&trial.id, 1).unwrap(), [0, 1]);
}

#[test]
fn a_trial_that_always_fails_ends_failed_with_its_error_after_the_retry_limit() {
    let dir = tempfile::tempdir().unwrap();
    // 32 images per game, but the default data has 20 concepts: every attempt fails.
    let sweep = sweep_file(
        dir.path(),
        "doomed",
        "{epochs: 1, steps: 2, test_limit: 16, game_size: 32}",
        "signal_game",
        "{sfe: {}}",
    );
    let db = dir.path().join("sweep.db");
    let (mut coord, port) = serve(&sweep, &db, &["--max-failures", "2"]);
    let mut w = Proc::spawn(worker(port, &[]));
    assert!(
        !coord.wait(Duration::from_secs(300)).success(),
        "a failed trial fails the sweep"
    );
    let tables = coord.stdout();
    assert!(w.wait(Duration::from_secs(60)).success());
    let outcomes: Vec<String> = attempts(&db, "doomed").into_iter().map(|a| a.2).collect();
    assert_eq!(outcomes, ["failed", "failed"]);
    let shown = status(&db);
    assert!(
        shown.contains("1 failed") && shown.contains("needs that many concepts"),
        "{shown}"
    );
    assert!(tables.contains("Failed trials") && tables.contains("needs that many concepts"));
}

#[test]
fn a_token_keeps_intruders_out_and_garbage_on_the_port_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(
        dir.path(),
        "guarded",
        "{epochs: 1, steps: 2, batch_size: 8, test_limit: 16}",
        "ssvae",
        "{sfe: {warm_start_epochs: 0}}",
    );
    let token = dir.path().join("token");
    std::fs::write(&token, "a-long-enough-shared-secret\n").unwrap();
    let db = dir.path().join("sweep.db");
    let token_arg = token.display().to_string();
    let (mut coord, port) = serve(&sweep, &db, &["--token-file", &token_arg]);
    // Garbage, then an HTTP/1 request, then a half-open connection.
    for junk in [
        &b"\x00\xffgarbage\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI",
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(junk);
    }
    let mut intruder = Proc::spawn(worker(port, &["--name", "intruder"]));
    let status_code = intruder.wait(Duration::from_secs(60));
    assert!(!status_code.success());
    assert!(
        intruder.seen.iter().any(|l| l.contains("requires a token")),
        "{}",
        intruder.seen.join("\n")
    );
    let mut wrong = worker(port, &["--name", "wrong"]);
    wrong.env("LVM_SWEEP_TOKEN", "not-the-right-secret-at-all");
    let mut wrong = Proc::spawn(wrong);
    assert!(!wrong.wait(Duration::from_secs(60)).success());
    assert!(wrong.seen.iter().any(|l| l.contains("wrong token")));
    let mut member = Proc::spawn(worker(
        port,
        &["--name", "member", "--token-file", &token_arg],
    ));
    assert!(
        coord.wait(Duration::from_secs(300)).success(),
        "{}",
        coord.seen.join("\n")
    );
    assert!(member.wait(Duration::from_secs(60)).success());
    assert_eq!(attempts(&db, "guarded"), own(&[(1, "member", "succeeded")]));
}

#[test]
fn a_drained_worker_hands_back_its_trial_which_resumes_with_identical_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(
        dir.path(),
        "drain",
        "{epochs: 3, test_limit: 16}",
        "signal_game",
        "{sfe: {batch_size: 16}}",
    );
    let db = dir.path().join("sweep.db");
    let (mut coord, port) = serve(&sweep, &db, &[]);
    let mut first = Proc::spawn(worker(port, &["--name", "first"]));
    // Wait for the first epoch's report, then ask the worker to drain.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let trials = Store::open(&db).unwrap().trials("drain").unwrap();
        if trials[0].epochs >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no epoch was reported");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = first.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = first.wait(Duration::from_secs(120));
    assert!(status.success(), "a drained worker exits 0: {status}");
    {
        let store = Store::open(&db).unwrap();
        let attempts = store.attempts("drain").unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].outcome.as_deref(), Some("preempted"));
        let trial = &store.trials("drain").unwrap()[0];
        assert_eq!(trial.state, "pending");
        assert!(store.checkpoint(&trial.id).unwrap().is_some());
    }

    let mut second = Proc::spawn(worker(port, &["--name", "second"]));
    assert!(coord.wait(Duration::from_secs(600)).success());
    assert!(second.wait(Duration::from_secs(60)).success());
    let store = Store::open(&db).unwrap();
    let trial = &store.trials("drain").unwrap()[0];
    assert_eq!(trial.state, "succeeded");
    let outcomes: Vec<_> = store
        .attempts("drain")
        .unwrap()
        .into_iter()
        .map(|a| a.outcome.unwrap_or_default())
        .collect();
    assert_eq!(outcomes, ["preempted", "succeeded"]);

    // The same trial, uninterrupted, through `worker run`.
    let out = Command::new(&binaries().worker)
        .args([
            "run",
            "--task",
            "signal_game",
            "--estimator",
            "sfe",
            "--seed",
            "1",
        ])
        .args([
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--test-limit",
            "16",
            "--json",
        ])
        .arg("--data-dir")
        .arg(data_dir())
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let resumed = trial.metrics.as_ref().unwrap();
    for (name, value) in summary["metrics"].as_object().unwrap() {
        assert_eq!(resumed[name], value.as_f64().unwrap(), "{name}");
    }
}

/// A CA, and a certificate for `localhost` signed by it: (CA PEM, cert PEM, key PEM).
fn certificates() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn with_tls_a_worker_pinning_the_ca_connects_and_one_that_does_not_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = sweep_file(
        dir.path(),
        "sealed",
        "{epochs: 1, steps: 2, batch_size: 8, test_limit: 16}",
        "ssvae",
        "{sfe: {warm_start_epochs: 0}}",
    );
    let (ca, cert, key) = certificates();
    let path = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (ca, cert, key) = (
        path("ca.pem", &ca),
        path("cert.pem", &cert),
        path("key.pem", &key),
    );
    let db = dir.path().join("sweep.db");
    let (mut coord, port) = serve(&sweep, &db, &["--tls-cert", &cert, "--tls-key", &key]);
    let url = format!("https://localhost:{port}");
    let tls_worker = |extra: &[&str]| {
        let mut c = Command::new(&binaries().worker);
        c.args(["--coordinator", &url, "--spool-dir"])
            .arg(dir.path().join("spool"))
            .arg("--data-dir")
            .arg(data_dir())
            .args(["--give-up-after", "2"])
            .args(extra)
            .env("RUST_LOG", "warn");
        c
    };
    // Without the CA the certificate is not trusted, so nothing is leased.
    let mut stranger = Proc::spawn(tls_worker(&["--name", "stranger"]));
    assert!(!stranger.wait(Duration::from_secs(60)).success());
    // Plain HTTP to a TLS port fails too.
    let mut plain = Proc::spawn(worker(port, &["--name", "plain", "--give-up-after", "2"]));
    assert!(!plain.wait(Duration::from_secs(60)).success());
    let mut pinned = Proc::spawn(tls_worker(&["--name", "pinned", "--ca-file", &ca]));
    assert!(
        coord.wait(Duration::from_secs(300)).success(),
        "{}",
        coord.seen.join("\n")
    );
    assert!(pinned.wait(Duration::from_secs(60)).success());
    assert_eq!(attempts(&db, "sealed"), own(&[(1, "pinned", "succeeded")]));
}
