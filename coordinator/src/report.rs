//! Paper-style tables from a sweep's results: one table per task (per bit size for the
//! bit-vector VAE), a row per estimator, a column per metric of the task, each cell the mean
//! ± sample standard deviation over seeds, with the count shown when seeds are missing and
//! the best cell of each column marked according to the metric's direction. The table is
//! computed once ([`Report`]) and rendered as Markdown, LaTeX (booktabs), CSV or JSON, so
//! every format shows the same numbers.
//!
//! Trials of one estimator that differ in a hyperparameter other than the seed (a grid) get
//! a row each, labelled with the differing values.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use lvm_core::spec::{Task, TrialSpec};
use serde::Serialize;

use crate::store::StoredTrial;

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// GitHub Markdown.
    Md,
    /// LaTeX with booktabs rules.
    Latex,
    /// Comma-separated values, one line per cell.
    Csv,
    /// JSON with mean, std and n per (task, estimator, metric).
    Json,
}

/// The metrics of a task, in column order.
pub fn columns(task: Task) -> &'static [&'static str] {
    match task {
        Task::Ssvae => &["test_accuracy", "test_neg_elbo", "decoder_calls"],
        Task::SignalGame => &["test_success", "test_loss", "decoder_calls"],
        Task::Bitvec => &["test_nll_bits_per_dim", "test_neg_elbo", "decoder_calls"],
    }
}

/// Whether larger values of a metric are better.
pub fn higher_is_better(metric: &str) -> bool {
    matches!(metric, "test_accuracy" | "test_success")
}

/// Decimals shown for a metric.
fn decimals(metric: &str) -> usize {
    match metric {
        "test_neg_elbo" => 2,
        "decoder_calls" => 2,
        _ => 4,
    }
}

/// One cell: a metric of one row over its seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    /// Mean over the seeds that succeeded.
    pub mean: f64,
    /// Sample standard deviation (`None` with fewer than two seeds).
    pub std: Option<f64>,
    /// Seeds that contributed.
    pub n: usize,
    /// Whether this is the best mean of its column.
    pub best: bool,
}

/// One row: an estimator (and grid point).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The estimator's name.
    pub estimator: String,
    /// The row label: the estimator, plus the hyperparameters that tell its rows apart.
    pub label: String,
    /// Trials planned for the row (one per seed).
    pub expected: usize,
    /// A cell per column; `None` when no seed has finished.
    pub cells: BTreeMap<String, Option<Cell>>,
}

/// One table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    /// Title, e.g. `ssvae` or `bitvec (D=32)`.
    pub title: String,
    /// The task.
    pub task: String,
    /// Column metrics, in order.
    pub metrics: Vec<String>,
    /// Rows, in the task's estimator order.
    pub rows: Vec<Row>,
}

/// A failed trial, listed under the tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedTrial {
    /// The trial id.
    pub trial: String,
    /// Table title.
    pub table: String,
    /// Row label.
    pub label: String,
    /// The seed.
    pub seed: u64,
    /// The error.
    pub error: String,
}

/// All tables of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The sweep.
    pub sweep: String,
    /// Tables, by task.
    pub tables: Vec<Table>,
    /// Trials that ended as failed.
    pub failed: Vec<FailedTrial>,
}

/// A trial parsed for the report.
struct Parsed<'a> {
    spec: TrialSpec,
    hyper: serde_json::Map<String, serde_json::Value>,
    trial: &'a StoredTrial,
}

fn table_title(spec: &TrialSpec) -> String {
    match (spec.task, spec.hyper.bits) {
        (Task::Bitvec, Some(bits)) => format!("bitvec (D={bits})"),
        (task, _) => task.name().to_owned(),
    }
}

fn mean_std(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.len() > 1).then(|| {
        let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
        (ss / (n - 1.0)).sqrt()
    });
    (mean, std)
}

impl Report {
    /// Computes the tables of `sweep` from its stored trials.
    pub fn compute(sweep: &str, trials: &[StoredTrial]) -> Result<Self, String> {
        let mut parsed = Vec::new();
        for trial in trials {
            let spec: TrialSpec = serde_json::from_str(&trial.spec_json)
                .map_err(|e| format!("trial {}: stored spec is unreadable: {e}", trial.id))?;
            let mut hyper = match serde_json::to_value(&spec.hyper) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => return Err(format!("trial {}: hyperparameters are not a map", trial.id)),
            };
            hyper.remove("bits");
            parsed.push(Parsed { spec, hyper, trial });
        }

        // Group by table, then by estimator; then split an estimator's trials by the
        // hyperparameters that vary among them.
        let mut by_table: BTreeMap<(usize, String), Vec<&Parsed>> = BTreeMap::new();
        for p in &parsed {
            let order = Task::ALL
                .iter()
                .position(|t| *t == p.spec.task)
                .unwrap_or(0);
            by_table
                .entry((order, table_title(&p.spec)))
                .or_default()
                .push(p);
        }
        let mut tables = Vec::new();
        let mut failed = Vec::new();
        for ((_, title), members) in by_table {
            let task = members[0].spec.task;
            let metrics: Vec<String> = columns(task).iter().map(|m| m.to_string()).collect();
            let mut rows = Vec::new();
            for estimator in task.estimators() {
                let own: Vec<&&Parsed> = members
                    .iter()
                    .filter(|p| p.spec.estimator == *estimator)
                    .collect();
                if own.is_empty() {
                    continue;
                }
                let varying: BTreeSet<&String> = own[0]
                    .hyper
                    .keys()
                    .filter(|k| own.iter().any(|p| p.hyper.get(*k) != own[0].hyper.get(*k)))
                    .collect();
                let mut variants: BTreeMap<String, Vec<&&Parsed>> = BTreeMap::new();
                for p in &own {
                    let label = if varying.is_empty() {
                        estimator.name().to_owned()
                    } else {
                        let parts: Vec<String> = varying
                            .iter()
                            .map(|k| format!("{k}={}", p.hyper.get(*k).unwrap_or_default()))
                            .collect();
                        format!("{} ({})", estimator.name(), parts.join(", "))
                    };
                    variants.entry(label).or_default().push(p);
                }
                for (label, group) in variants {
                    let mut cells = BTreeMap::new();
                    for metric in &metrics {
                        let values: Vec<f64> = group
                            .iter()
                            .filter(|p| p.trial.state == "succeeded")
                            .filter_map(|p| p.trial.metrics.as_ref()?.get(metric).copied())
                            .collect();
                        let cell = (!values.is_empty()).then(|| {
                            let (mean, std) = mean_std(&values);
                            Cell {
                                mean,
                                std,
                                n: values.len(),
                                best: false,
                            }
                        });
                        cells.insert(metric.clone(), cell);
                    }
                    for p in group.iter().filter(|p| p.trial.state == "failed") {
                        failed.push(FailedTrial {
                            trial: p.trial.id.clone(),
                            table: title.clone(),
                            label: label.clone(),
                            seed: p.spec.seed,
                            error: p.trial.error.clone().unwrap_or_default(),
                        });
                    }
                    rows.push(Row {
                        estimator: estimator.name().to_owned(),
                        label,
                        expected: group.len(),
                        cells,
                    });
                }
            }
            mark_best(&metrics, &mut rows);
            tables.push(Table {
                title,
                task: task.name().to_owned(),
                metrics,
                rows,
            });
        }
        Ok(Self {
            sweep: sweep.to_owned(),
            tables,
            failed,
        })
    }

    /// Renders the report in `format`.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Md => self.markdown(),
            Format::Latex => self.latex(),
            Format::Csv => self.csv(),
            Format::Json => serde_json::to_string_pretty(self).expect("report serializes") + "\n",
        }
    }

    fn markdown(&self) -> String {
        let mut out = format!("# Sweep `{}`\n", self.sweep);
        for table in &self.tables {
            let _ = write!(out, "\n## {}\n\n| estimator |", table.title);
            for m in &table.metrics {
                let arrow = if higher_is_better(m) { "↑" } else { "↓" };
                let _ = write!(out, " {m} {arrow} |");
            }
            out.push_str("\n| --- |");
            out.push_str(&" ---: |".repeat(table.metrics.len()));
            out.push('\n');
            for row in &table.rows {
                let _ = write!(out, "| {} |", row.label);
                for m in &table.metrics {
                    let text = cell_text(row, m, "±");
                    match &row.cells[m] {
                        Some(c) if c.best => {
                            let _ = write!(out, " **{text}** |");
                        }
                        _ => {
                            let _ = write!(out, " {text} |");
                        }
                    }
                }
                out.push('\n');
            }
        }
        if !self.failed.is_empty() {
            out.push_str("\n## Failed trials\n\n");
            for f in &self.failed {
                let _ = writeln!(
                    out,
                    "- `{}` {} {}, seed {}: {}",
                    f.trial, f.table, f.label, f.seed, f.error
                );
            }
        }
        out
    }

    fn latex(&self) -> String {
        let mut out = format!("% Sweep {}\n", self.sweep);
        for table in &self.tables {
            let _ = writeln!(out, "\n% {}", table.title);
            let _ = writeln!(
                out,
                "\\begin{{tabular}}{{l{}}}\n\\toprule",
                "r".repeat(table.metrics.len())
            );
            out.push_str("estimator");
            for m in &table.metrics {
                let arrow = if higher_is_better(m) {
                    "$\\uparrow$"
                } else {
                    "$\\downarrow$"
                };
                let _ = write!(out, " & {} {arrow}", latex_escape(m));
            }
            out.push_str(" \\\\\n\\midrule\n");
            for row in &table.rows {
                out.push_str(&latex_escape(&row.label));
                for m in &table.metrics {
                    let text = cell_text(row, m, "$\\pm$");
                    match &row.cells[m] {
                        Some(c) if c.best => {
                            let _ = write!(out, " & \\textbf{{{text}}}");
                        }
                        _ => {
                            let _ = write!(out, " & {text}");
                        }
                    }
                }
                out.push_str(" \\\\\n");
            }
            out.push_str("\\bottomrule\n\\end{tabular}\n");
        }
        for f in &self.failed {
            let _ = writeln!(
                out,
                "% failed: {} {} {} seed {}: {}",
                f.trial, f.table, f.label, f.seed, f.error
            );
        }
        out
    }

    fn csv(&self) -> String {
        let mut out = String::from("table,estimator,metric,mean,std,n,expected,best\n");
        for table in &self.tables {
            for row in &table.rows {
                for m in &table.metrics {
                    let (mean, std, n, best) = match &row.cells[m] {
                        Some(c) => (
                            format!("{:.*}", decimals(m), c.mean),
                            c.std
                                .map(|s| format!("{:.*}", decimals(m), s))
                                .unwrap_or_default(),
                            c.n,
                            c.best,
                        ),
                        None => (String::new(), String::new(), 0, false),
                    };
                    let _ = writeln!(
                        out,
                        "{},{},{m},{mean},{std},{n},{},{best}",
                        csv_field(&table.title),
                        csv_field(&row.label),
                        row.expected
                    );
                }
            }
        }
        out
    }
}

fn mark_best(metrics: &[String], rows: &mut [Row]) {
    for m in metrics {
        let higher = higher_is_better(m);
        let best = rows
            .iter()
            .filter_map(|r| r.cells[m].as_ref().map(|c| c.mean))
            .reduce(|a, b| if (b > a) == higher { b } else { a });
        let Some(best) = best else { continue };
        for row in rows.iter_mut() {
            if let Some(cell) = row.cells.get_mut(m).and_then(Option::as_mut) {
                cell.best = cell.mean == best;
            }
        }
    }
}

/// A cell as text: `mean ± std`, with `(n=k/N)` when seeds are missing, `–` when empty.
fn cell_text(row: &Row, metric: &str, pm: &str) -> String {
    let Some(cell) = &row.cells[metric] else {
        return format!("– (n=0/{})", row.expected);
    };
    let d = decimals(metric);
    let mut text = match cell.std {
        Some(std) => format!("{:.d$} {pm} {:.d$}", cell.mean, std),
        None => format!("{:.d$}", cell.mean),
    };
    if cell.n < row.expected {
        let _ = write!(text, " (n={}/{})", cell.n, row.expected);
    }
    text
}

fn latex_escape(text: &str) -> String {
    text.replace('\\', "\\textbackslash{}")
        .replace('_', "\\_")
        .replace('&', "\\&")
        .replace('%', "\\%")
        .replace('#', "\\#")
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lvm_core::spec::Estimator;

    fn trial(estimator: Estimator, seed: u64, metrics: Option<[f64; 3]>) -> StoredTrial {
        let spec = TrialSpec::paper(Task::Ssvae, estimator, seed);
        StoredTrial {
            id: format!("{}-{seed}", estimator.name()),
            spec_json: spec.canonical_json(),
            state: if metrics.is_some() {
                "succeeded"
            } else {
                "failed"
            }
            .into(),
            attempts: 1,
            worker: None,
            error: metrics.is_none().then(|| "NaN loss at step 3".into()),
            metrics: metrics.map(|[a, e, c]| {
                BTreeMap::from([
                    ("test_accuracy".into(), a),
                    ("test_neg_elbo".into(), e),
                    ("decoder_calls".into(), c),
                ])
            }),
            wall_seconds: Some(1.0),
            epochs: 1,
        }
    }

    fn example() -> Report {
        let trials = vec![
            trial(Estimator::Sfe, 1, Some([0.90, 120.0, 1.0])),
            trial(Estimator::Sfe, 2, Some([0.80, 130.0, 1.0])),
            trial(Estimator::Sparsemax, 1, Some([0.95, 110.0, 1.2])),
            trial(Estimator::Sparsemax, 2, None),
        ];
        Report::compute("s", &trials).unwrap()
    }

    #[test]
    fn cells_are_mean_and_sample_std_with_best_by_direction() {
        let report = example();
        let table = &report.tables[0];
        assert_eq!(table.title, "ssvae");
        let sfe = &table.rows[0];
        assert_eq!(sfe.label, "sfe");
        let acc = sfe.cells["test_accuracy"].as_ref().unwrap();
        // Mean of 0.9 and 0.8; sample std = |0.9 - 0.8| / √2.
        assert!((acc.mean - 0.85).abs() < 1e-12);
        assert!((acc.std.unwrap() - 0.1 / 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(acc.n, 2);
        let sparse = &table.rows[1];
        let sparse_acc = sparse.cells["test_accuracy"].as_ref().unwrap();
        assert_eq!((sparse_acc.n, sparse_acc.std), (1, None));
        // Accuracy: higher wins (sparsemax); calls: lower wins (sfe); ELBO: lower (sparsemax).
        assert!(sparse_acc.best && !acc.best);
        assert!(sfe.cells["decoder_calls"].as_ref().unwrap().best);
        assert!(sparse.cells["test_neg_elbo"].as_ref().unwrap().best);
        assert_eq!(report.failed.len(), 1);
        assert!(report.failed[0].error.contains("NaN"));
    }

    #[test]
    fn every_format_shows_the_same_numbers() {
        let report = example();
        let md = report.render(Format::Md);
        assert!(md.contains("| sfe | 0.8500 ± 0.0707 | 125.00 ± 7.07 | **1.00 ± 0.00** |"));
        assert!(md.contains("| sparsemax | **0.9500 (n=1/2)** |"), "{md}");
        assert!(md.contains("NaN loss at step 3"));
        let latex = report.render(Format::Latex);
        assert!(latex.contains("sfe & 0.8500 $\\pm$ 0.0707 & 125.00 $\\pm$ 7.07"));
        assert!(latex.contains("\\textbf{0.9500 (n=1/2)}"));
        let csv = report.render(Format::Csv);
        assert!(csv.contains("ssvae,sfe,test_accuracy,0.8500,0.0707,2,2,false\n"));
        assert!(csv.contains("ssvae,sparsemax,test_accuracy,0.9500,,1,2,true\n"));
        let json: serde_json::Value = serde_json::from_str(&report.render(Format::Json)).unwrap();
        let cell = &json["tables"][0]["rows"][0]["cells"]["test_accuracy"];
        assert!((cell["mean"].as_f64().unwrap() - 0.85).abs() < 1e-12);
        assert_eq!(cell["n"], 2);
    }

    #[test]
    fn grid_points_get_rows_of_their_own() {
        let mut a = trial(Estimator::Sfe, 1, Some([0.9, 120.0, 1.0]));
        let mut spec: TrialSpec = serde_json::from_str(&a.spec_json).unwrap();
        spec.hyper.lr = 0.01;
        a.spec_json = spec.canonical_json();
        let b = trial(Estimator::Sfe, 1, Some([0.8, 125.0, 1.0]));
        let report = Report::compute("s", &[a, b]).unwrap();
        let labels: Vec<&str> = report.tables[0]
            .rows
            .iter()
            .map(|r| r.label.as_str())
            .collect();
        assert_eq!(labels.len(), 2);
        assert!(
            labels.iter().all(|l| l.starts_with("sfe (lr=")),
            "{labels:?}"
        );
    }
}
