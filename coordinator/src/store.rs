//! The coordinator's store: one SQLite file (WAL) that is the single source of truth for
//! sweeps, trials, attempts, per-epoch metrics, results, checkpoints and workers. Every
//! change the scheduler makes is written here, in one transaction, before the worker hears
//! the answer, so a coordinator killed at any instant restarts from this file and loses
//! nothing a worker was told.
//!
//! The schema carries its version in `PRAGMA user_version`; a store written by a newer
//! version of the coordinator is refused rather than misread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use thiserror::Error;

use crate::scheduler::{AttemptEnd, Transition, TrialEntry, TrialState};
use crate::sweep::Sweep;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 1;

/// Why the store cannot be used.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite refused an operation.
    #[error("store {path}: {source}")]
    Sqlite {
        /// The store file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The file was written by a newer coordinator.
    #[error(
        "store {path}: schema version {found} is newer than this coordinator's \
         ({SCHEMA_VERSION}); use a newer coordinator or another --db"
    )]
    NewerSchema {
        /// The store file.
        path: PathBuf,
        /// The version found.
        found: i64,
    },
    /// A stored row cannot be read back.
    #[error("store {path}: {detail}")]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No sweep of that name is stored.
    #[error("store {path}: no sweep named '{name}' (stored: {stored})")]
    UnknownSweep {
        /// The store file.
        path: PathBuf,
        /// The name asked for.
        name: String,
        /// The names stored, comma-separated.
        stored: String,
    },
}

const SCHEMA: &str = "
CREATE TABLE sweeps (
    name TEXT PRIMARY KEY,
    file TEXT NOT NULL,
    submitted_ms INTEGER NOT NULL
);
CREATE TABLE trials (
    id TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    expires_ms INTEGER,
    error TEXT,
    metrics_json TEXT,
    wall_seconds REAL,
    finished_ms INTEGER
);
CREATE TABLE sweep_trials (
    sweep TEXT NOT NULL REFERENCES sweeps(name),
    trial TEXT NOT NULL REFERENCES trials(id),
    position INTEGER NOT NULL,
    PRIMARY KEY (sweep, trial)
);
CREATE TABLE attempts (
    trial TEXT NOT NULL REFERENCES trials(id),
    attempt INTEGER NOT NULL,
    worker TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    outcome TEXT,
    error TEXT,
    epochs INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (trial, attempt)
);
CREATE TABLE epochs (
    trial TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    PRIMARY KEY (trial, attempt, epoch)
);
CREATE TABLE checkpoints (
    trial TEXT PRIMARY KEY REFERENCES trials(id),
    attempt INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    bytes BLOB NOT NULL
);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    backend TEXT NOT NULL,
    device TEXT NOT NULL,
    slots INTEGER NOT NULL,
    version TEXT NOT NULL,
    registered_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
";

/// A worker's registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    /// Its identity.
    pub id: String,
    /// Its name (host name or chosen).
    pub name: String,
    /// Backend, e.g. `flex`.
    pub backend: String,
    /// Device, e.g. `cpu`.
    pub device: String,
    /// Trials run at once.
    pub slots: u32,
    /// Worker version.
    pub version: String,
}

/// A trial as stored, for status and reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTrial {
    /// Its id.
    pub id: String,
    /// The spec's JSON.
    pub spec_json: String,
    /// State name: pending, running, succeeded, failed.
    pub state: String,
    /// Attempts started.
    pub attempts: u32,
    /// The worker of the current attempt, while running.
    pub worker: Option<String>,
    /// The last error, if any.
    pub error: Option<String>,
    /// Final metrics, once succeeded.
    pub metrics: Option<BTreeMap<String, f64>>,
    /// Wall seconds of the successful attempt.
    pub wall_seconds: Option<f64>,
    /// Epochs reported by the current attempt.
    pub epochs: u32,
}

/// One ended attempt, for status.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    /// The trial.
    pub trial: String,
    /// The attempt number.
    pub attempt: u32,
    /// The worker that ran it.
    pub worker: String,
    /// How it ended (`None` while running).
    pub outcome: Option<String>,
    /// Its error.
    pub error: Option<String>,
}

/// The open store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens the store at `path`, creating it if missing.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        let mut store = Self {
            conn,
            path: path.to_owned(),
        };
        store.init()?;
        Ok(store)
    }

    /// Opens an existing store without creating one.
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Corrupt {
                path: path.to_owned(),
                detail: "no such file (run `coordinator --sweep FILE` first, or pass --db)".into(),
            });
        }
        Self::open(path)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    fn init(&mut self) -> Result<(), StoreError> {
        let setup = || -> rusqlite::Result<i64> {
            self.conn.busy_timeout(std::time::Duration::from_secs(10))?;
            self.conn.pragma_update(None, "journal_mode", "WAL")?;
            // In WAL mode NORMAL survives any crash of the process; only a power loss can
            // drop the last transactions.
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
            self.conn.pragma_update(None, "foreign_keys", "ON")?;
            self.conn
                .query_row("PRAGMA user_version", [], |row| row.get(0))
        };
        let version = setup().map_err(|e| self.sql(e))?;
        match version {
            0 => {
                let tx = self.conn.transaction().map_err(|e| StoreError::Sqlite {
                    path: self.path.clone(),
                    source: e,
                })?;
                tx.execute_batch(SCHEMA)
                    .and_then(|()| tx.pragma_update(None, "user_version", SCHEMA_VERSION))
                    .and_then(|()| tx.commit())
                    .map_err(|e| StoreError::Sqlite {
                        path: self.path.clone(),
                        source: e,
                    })
            }
            SCHEMA_VERSION => Ok(()),
            found if found > SCHEMA_VERSION => Err(StoreError::NewerSchema {
                path: self.path.clone(),
                found,
            }),
            found => Err(self.corrupt(format!("unknown schema version {found}"))),
        }
    }

    fn transaction(&mut self) -> Result<Transaction<'_>, StoreError> {
        let path = self.path.clone();
        self.conn
            .transaction()
            .map_err(|source| StoreError::Sqlite { path, source })
    }

    /// Stores a sweep and its trials; trials already stored keep their state. Returns the
    /// number of trials new to the store.
    pub fn submit(&mut self, sweep: &Sweep, file: &str, now_ms: u64) -> Result<usize, StoreError> {
        let path = self.path.clone();
        let run = |tx: &Transaction| -> rusqlite::Result<usize> {
            tx.execute(
                "INSERT INTO sweeps (name, file, submitted_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET file = ?2, submitted_ms = ?3",
                params![sweep.name, file, now_ms as i64],
            )?;
            let base: i64 = tx.query_row(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM sweep_trials WHERE sweep = ?1",
                [&sweep.name],
                |row| row.get(0),
            )?;
            let mut added = 0;
            for (i, trial) in sweep.trials.iter().enumerate() {
                added += tx.execute(
                    "INSERT OR IGNORE INTO trials (id, spec_json, state)
                     VALUES (?1, ?2, 'pending')",
                    params![trial.id, trial.spec.canonical_json()],
                )?;
                tx.execute(
                    "INSERT OR IGNORE INTO sweep_trials (sweep, trial, position)
                     VALUES (?1, ?2, ?3)",
                    params![sweep.name, trial.id, base + i as i64],
                )?;
            }
            Ok(added)
        };
        let tx = self.transaction()?;
        let added = run(&tx).and_then(|n| tx.commit().map(|()| n));
        added.map_err(|source| StoreError::Sqlite { path, source })
    }

    /// The names of the stored sweeps, oldest first.
    pub fn sweeps(&self) -> Result<Vec<String>, StoreError> {
        let run = || -> rusqlite::Result<Vec<String>> {
            let mut stmt = self
                .conn
                .prepare("SELECT name FROM sweeps ORDER BY submitted_ms, name")?;
            stmt.query_map([], |row| row.get(0))?.collect()
        };
        run().map_err(|e| self.sql(e))
    }

    /// Checks that `name` is a stored sweep.
    pub fn require_sweep(&self, name: &str) -> Result<(), StoreError> {
        let names = self.sweeps()?;
        if names.iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(StoreError::UnknownSweep {
                path: self.path.clone(),
                name: name.into(),
                stored: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            })
        }
    }

    /// The scheduler entries of a sweep's trials, in sweep order.
    pub fn entries(&self, sweep: &str) -> Result<Vec<(String, TrialEntry)>, StoreError> {
        let run = || -> rusqlite::Result<Vec<_>> {
            let mut stmt = self.conn.prepare(
                "SELECT t.id, t.state, t.attempts, t.failures, t.lost, t.worker, t.expires_ms,
                        t.error
                 FROM sweep_trials s JOIN trials t ON t.id = s.trial
                 WHERE s.sweep = ?1 ORDER BY s.position",
            )?;
            stmt.query_map([sweep], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, u32>(2)?,
                    row.get::<_, u32>(3)?,
                    row.get::<_, u32>(4)?,
                    row.get::<_, Option<String>>(5)?,
                    row.get::<_, Option<i64>>(6)?,
                    row.get::<_, Option<String>>(7)?,
                ))
            })?
            .collect()
        };
        let rows = run().map_err(|e| self.sql(e))?;
        rows.into_iter()
            .map(
                |(id, state, attempts, failures, lost, worker, expires, error)| {
                    let state = match state.as_str() {
                        "pending" => TrialState::Pending,
                        "running" => TrialState::Running {
                            attempt: attempts,
                            worker: worker.unwrap_or_default(),
                            expires_ms: expires.unwrap_or(0).max(0) as u64,
                        },
                        "succeeded" => TrialState::Succeeded,
                        "failed" => TrialState::Failed {
                            error: error.unwrap_or_default(),
                        },
                        other => {
                            return Err(self.corrupt(format!("trial {id} has state '{other}'")));
                        }
                    };
                    let entry = TrialEntry {
                        state,
                        attempts,
                        failures,
                        lost,
                    };
                    Ok((id, entry))
                },
            )
            .collect()
    }

    /// A trial's spec JSON.
    pub fn spec_json(&self, trial: &str) -> Result<String, StoreError> {
        self.conn
            .query_row(
                "SELECT spec_json FROM trials WHERE id = ?1",
                [trial],
                |row| row.get(0),
            )
            .map_err(|e| self.sql(e))
    }

    /// Persists a scheduler transition.
    pub fn apply(&mut self, transition: &Transition, now_ms: u64) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.transaction()?;
        let run = |tx: &Transaction| -> rusqlite::Result<()> {
            match transition {
                Transition::Leased {
                    trial,
                    attempt,
                    worker,
                    expires_ms,
                } => {
                    tx.execute(
                        "UPDATE trials SET state = 'running', attempts = ?2, worker = ?3,
                                expires_ms = ?4 WHERE id = ?1",
                        params![trial, attempt, worker, *expires_ms as i64],
                    )?;
                    tx.execute(
                        "INSERT INTO attempts (trial, attempt, worker, started_ms)
                         VALUES (?1, ?2, ?3, ?4)",
                        params![trial, attempt, worker, now_ms as i64],
                    )?;
                }
                Transition::Ended {
                    trial,
                    attempt,
                    end,
                    error,
                    state,
                    result,
                } => {
                    tx.execute(
                        "UPDATE attempts SET ended_ms = ?3, outcome = ?4, error = ?5
                         WHERE trial = ?1 AND attempt = ?2",
                        params![trial, attempt, now_ms as i64, end.name(), error],
                    )?;
                    let (failures, lost) = match end {
                        AttemptEnd::Failed => (1, 0),
                        AttemptEnd::Lost => (0, 1),
                        _ => (0, 0),
                    };
                    let final_error = match state {
                        TrialState::Failed { error } => Some(error.clone()),
                        _ => error.clone(),
                    };
                    tx.execute(
                        "UPDATE trials SET state = ?2, worker = NULL, expires_ms = NULL,
                                failures = failures + ?3, lost = lost + ?4,
                                error = COALESCE(?5, error)
                         WHERE id = ?1",
                        params![trial, state.name(), failures, lost, final_error],
                    )?;
                    if let Some((metrics, wall)) = result {
                        let json = serde_json::to_string(metrics).expect("metrics serialize");
                        tx.execute(
                            "UPDATE trials SET metrics_json = ?2, wall_seconds = ?3,
                                    finished_ms = ?4, error = NULL
                             WHERE id = ?1",
                            params![trial, json, wall, now_ms as i64],
                        )?;
                    }
                    if state.is_terminal() {
                        tx.execute("DELETE FROM checkpoints WHERE trial = ?1", [trial])?;
                        if let TrialState::Failed { .. } = state {
                            tx.execute(
                                "UPDATE trials SET finished_ms = ?2 WHERE id = ?1",
                                params![trial, now_ms as i64],
                            )?;
                        }
                    }
                }
            }
            Ok(())
        };
        run(&tx)
            .and_then(|()| tx.commit())
            .map_err(|source| StoreError::Sqlite { path, source })
    }

    /// Records an epoch of a current attempt, and its checkpoint when it carries one.
    pub fn record_epoch(
        &mut self,
        trial: &str,
        attempt: u32,
        epoch: u32,
        metrics: &BTreeMap<String, f64>,
        checkpoint: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.transaction()?;
        let run = |tx: &Transaction| -> rusqlite::Result<()> {
            let json = serde_json::to_string(metrics).expect("metrics serialize");
            tx.execute(
                "INSERT OR REPLACE INTO epochs (trial, attempt, epoch, metrics_json)
                 VALUES (?1, ?2, ?3, ?4)",
                params![trial, attempt, epoch, json],
            )?;
            tx.execute(
                "UPDATE attempts SET epochs = MAX(epochs, ?3) WHERE trial = ?1 AND attempt = ?2",
                params![trial, attempt, epoch + 1],
            )?;
            if let Some(bytes) = checkpoint {
                tx.execute(
                    "INSERT OR REPLACE INTO checkpoints (trial, attempt, epoch, bytes)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![trial, attempt, epoch, bytes],
                )?;
            }
            Ok(())
        };
        run(&tx)
            .and_then(|()| tx.commit())
            .map_err(|source| StoreError::Sqlite { path, source })
    }

    /// The epochs an attempt reported, in order.
    pub fn epochs(&self, trial: &str, attempt: u32) -> Result<Vec<u32>, StoreError> {
        let run = || -> rusqlite::Result<Vec<u32>> {
            let mut stmt = self.conn.prepare(
                "SELECT epoch FROM epochs WHERE trial = ?1 AND attempt = ?2 ORDER BY epoch",
            )?;
            stmt.query_map(params![trial, attempt], |row| row.get(0))?
                .collect()
        };
        run().map_err(|e| self.sql(e))
    }

    /// The latest checkpoint of a trial, if any.
    pub fn checkpoint(&self, trial: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn
            .query_row(
                "SELECT bytes FROM checkpoints WHERE trial = ?1",
                [trial],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// Registers a worker.
    pub fn register_worker(
        &mut self,
        worker: &WorkerRecord,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO workers
                 (id, name, backend, device, slots, version, registered_ms, last_seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                params![
                    worker.id,
                    worker.name,
                    worker.backend,
                    worker.device,
                    worker.slots,
                    worker.version,
                    now_ms as i64
                ],
            )
            .map(|_| ())
            .map_err(|e| self.sql(e))
    }

    /// Whether a worker id is registered.
    pub fn has_worker(&self, id: &str) -> Result<bool, StoreError> {
        self.conn
            .query_row("SELECT 1 FROM workers WHERE id = ?1", [id], |_| Ok(()))
            .optional()
            .map(|row| row.is_some())
            .map_err(|e| self.sql(e))
    }

    /// Notes that a worker was heard from.
    pub fn touch_worker(&mut self, id: &str, now_ms: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE workers SET last_seen_ms = ?2 WHERE id = ?1",
                params![id, now_ms as i64],
            )
            .map(|_| ())
            .map_err(|e| self.sql(e))
    }

    /// A worker's name, for display.
    pub fn worker_name(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT name FROM workers WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// A sweep's trials, in sweep order.
    pub fn trials(&self, sweep: &str) -> Result<Vec<StoredTrial>, StoreError> {
        let run = || -> rusqlite::Result<Vec<_>> {
            let mut stmt = self.conn.prepare(
                "SELECT t.id, t.spec_json, t.state, t.attempts, t.worker, t.error,
                        t.metrics_json, t.wall_seconds,
                        (SELECT a.epochs FROM attempts a
                          WHERE a.trial = t.id AND a.attempt = t.attempts)
                 FROM sweep_trials s JOIN trials t ON t.id = s.trial
                 WHERE s.sweep = ?1 ORDER BY s.position",
            )?;
            stmt.query_map([sweep], |row| {
                Ok((
                    StoredTrial {
                        id: row.get(0)?,
                        spec_json: row.get(1)?,
                        state: row.get(2)?,
                        attempts: row.get(3)?,
                        worker: row.get(4)?,
                        error: row.get(5)?,
                        metrics: None,
                        wall_seconds: row.get(7)?,
                        epochs: row.get::<_, Option<u32>>(8)?.unwrap_or(0),
                    },
                    row.get::<_, Option<String>>(6)?,
                ))
            })?
            .collect()
        };
        let rows = run().map_err(|e| self.sql(e))?;
        rows.into_iter()
            .map(|(mut trial, metrics)| {
                if let Some(json) = metrics {
                    trial.metrics = Some(serde_json::from_str(&json).map_err(|e| {
                        self.corrupt(format!("trial {}: metrics are not JSON: {e}", trial.id))
                    })?);
                }
                Ok(trial)
            })
            .collect()
    }

    /// Every attempt of a sweep's trials, oldest first.
    pub fn attempts(&self, sweep: &str) -> Result<Vec<AttemptRecord>, StoreError> {
        let run = || -> rusqlite::Result<Vec<_>> {
            let mut stmt = self.conn.prepare(
                "SELECT a.trial, a.attempt, a.worker, a.outcome, a.error
                 FROM attempts a JOIN sweep_trials s ON s.trial = a.trial
                 WHERE s.sweep = ?1 ORDER BY a.started_ms, a.trial, a.attempt",
            )?;
            stmt.query_map([sweep], |row| {
                Ok(AttemptRecord {
                    trial: row.get(0)?,
                    attempt: row.get(1)?,
                    worker: row.get(2)?,
                    outcome: row.get(3)?,
                    error: row.get(4)?,
                })
            })?
            .collect()
        };
        run().map_err(|e| self.sql(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{LeaseDecision, Outcome, Policy, Scheduler};

    const SWEEP: &str = "
name: t
defaults: {steps: 1}
experiments:
  - task: ssvae
    seeds: [1, 2]
    estimators: {sfe: {}}
";

    fn sweep(text: &str) -> Sweep {
        Sweep::parse(text, "t.yaml").unwrap()
    }

    #[test]
    fn submitting_twice_adds_nothing_and_new_seeds_add_exactly_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db")).unwrap();
        assert_eq!(store.submit(&sweep(SWEEP), "t.yaml", 1).unwrap(), 2);
        assert_eq!(store.submit(&sweep(SWEEP), "t.yaml", 2).unwrap(), 0);
        let more = SWEEP.replace("[1, 2]", "[1, 2, 3]");
        assert_eq!(store.submit(&sweep(&more), "t.yaml", 3).unwrap(), 1);
        let entries = store.entries("t").unwrap();
        assert_eq!(entries.len(), 3);
        assert!(entries.iter().all(|(_, e)| e.state == TrialState::Pending));
    }

    #[test]
    fn transitions_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut store = Store::open(&path).unwrap();
        store.submit(&sweep(SWEEP), "t.yaml", 1).unwrap();
        let mut s = Scheduler::new(Policy::default());
        for (id, entry) in store.entries("t").unwrap() {
            s.add(&id, entry, 0);
        }
        let (LeaseDecision::Granted { trial, attempt, .. }, Some(t)) = s.lease("w", 10) else {
            panic!("no lease");
        };
        store.apply(&t, 10).unwrap();
        let metrics = BTreeMap::from([("test_accuracy".to_owned(), 0.25)]);
        store
            .record_epoch(&trial, attempt, 0, &metrics, Some(b"ckpt"))
            .unwrap();
        assert_eq!(store.checkpoint(&trial).unwrap().unwrap(), b"ckpt");
        let outcome = Outcome::Succeeded {
            metrics: metrics.clone(),
            wall_seconds: 2.5,
        };
        let t = s.finish("w", &trial, attempt, outcome, 20).unwrap();
        store.apply(&t, 20).unwrap();
        let (LeaseDecision::Granted { trial: t2, .. }, Some(t)) = s.lease("w", 30) else {
            panic!("no second lease");
        };
        store.apply(&t, 30).unwrap();
        drop(store);

        let store = Store::open(&path).unwrap();
        let entries: BTreeMap<_, _> = store.entries("t").unwrap().into_iter().collect();
        assert_eq!(entries[&trial].state, TrialState::Succeeded);
        assert!(matches!(
            &entries[&t2].state,
            TrialState::Running { attempt: 1, worker, .. } if worker == "w"
        ));
        // The finished trial's checkpoint is dropped; its result is kept.
        assert!(store.checkpoint(&trial).unwrap().is_none());
        let stored = store.trials("t").unwrap();
        let done = stored.iter().find(|t| t.id == trial).unwrap();
        assert_eq!(done.metrics.as_ref().unwrap()["test_accuracy"], 0.25);
        assert_eq!(done.wall_seconds, Some(2.5));
        let attempts = store.attempts("t").unwrap();
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0].outcome.as_deref(), Some("succeeded"));
    }

    #[test]
    fn a_store_from_a_newer_schema_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE x (a); PRAGMA user_version = 99;")
                .unwrap();
        }
        let err = Store::open(&path).unwrap_err();
        assert!(err.to_string().contains("schema version 99"), "{err}");
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 99);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(err.to_string().contains("s.db"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'x'; 4096]);
    }

    #[test]
    fn an_unknown_sweep_is_named_with_the_stored_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db")).unwrap();
        store.submit(&sweep(SWEEP), "t.yaml", 1).unwrap();
        let err = store.require_sweep("nope").unwrap_err().to_string();
        assert!(err.contains("'nope'") && err.contains("stored: t"), "{err}");
    }
}
