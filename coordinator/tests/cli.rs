//! The `coordinator` command line on bad input: one clear error naming the thing at fault,
//! a non-zero exit, and nothing stored.

use std::process::Command;

fn coordinator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(args)
        .output()
        .expect("running coordinator")
}

#[test]
fn a_bad_sweep_file_fails_before_anything_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("bad.yaml");
    std::fs::write(
        &sweep,
        "name: bad\nexperiments:\n  - task: ssvae\n    seeds: [1]\n    \
         estimators: {sparsemap: {}}\n",
    )
    .unwrap();
    let db = dir.path().join("s.db");
    let out = coordinator(&[
        "--sweep",
        sweep.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.yaml") && err.contains("sparsemap"),
        "{err}"
    );
    assert!(
        err.contains("sum_and_sample"),
        "lists the valid estimators: {err}"
    );
    assert!(!db.exists(), "nothing is stored for a bad sweep");
}

#[test]
fn reports_and_status_need_an_existing_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("missing.db");
    for sub in ["status", "report"] {
        let out = coordinator(&[sub, "--db", db.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sub}");
        assert!(err.contains("missing.db"), "{sub}: {err}");
        assert!(!db.exists());
    }
}

#[test]
fn a_public_address_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args([
            "--sweep",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps/ci.yaml"),
            "--db",
            dir.path().join("s.db").to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
        ])
        .env_remove("LVM_SWEEP_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("0.0.0.0:0") && err.contains("token"), "{err}");
}
