//! What the end-to-end tests share: the real `coordinator` and `worker` binaries (built on
//! first use, so they are never stale), the dataset directory, free loopback ports, and
//! child processes that are killed when a test ends, however it ends.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_owned()
}

/// The binaries under test.
#[derive(Debug)]
pub struct Binaries {
    /// `coordinator`.
    pub coordinator: PathBuf,
    /// `worker`.
    pub worker: PathBuf,
}

/// Builds the two binaries in this test's profile and returns their paths. They are built
/// as `cargo test --workspace` builds them (with the features the tests unify), so under
/// `cargo test --workspace` this is a no-op and never rebuilds the library a second time.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        // target/<profile>/deps/<test binary>
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary sits in target/<profile>/deps");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .current_dir(workspace())
            .args(["test", "--workspace", "--no-run"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            build.env("CARGO_TARGET_DIR", target);
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "building the binaries failed: {status}");
        let bin = |name: &str| {
            let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
            assert!(path.exists(), "{} was not built", path.display());
            path
        };
        Binaries {
            coordinator: bin("coordinator"),
            worker: bin("worker"),
        }
    })
}

/// The dataset directory: `$LVM_DATA_DIR` (relative to the workspace root), else `data`.
pub fn data_dir() -> PathBuf {
    let given = std::env::var_os("LVM_DATA_DIR").map_or_else(|| "data".into(), PathBuf::from);
    if given.is_absolute() {
        given
    } else {
        workspace().join(given)
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port()
}

/// A child process killed on drop, with its stderr collected line by line.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stderr line seen so far.
    pub seen: Vec<String>,
}

impl Proc {
    /// Starts `command` with stdout captured to a pipe and stderr read by a thread.
    pub fn spawn(mut command: Command) -> Self {
        command
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = command.spawn().expect("starting a binary under test");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits up to `timeout` for a stderr line containing `needle`, and returns it.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {timeout:?}; stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling a child") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                    self.seen.push(line);
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "still running after {timeout:?}; stderr:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the process wrote to stdout (after it exited).
    pub fn stdout(&mut self) -> String {
        use std::io::Read;
        let mut out = String::new();
        if let Some(mut pipe) = self.child.stdout.take() {
            let _ = pipe.read_to_string(&mut out);
        }
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `coordinator` with `args`.
pub fn coordinator(args: &[&str]) -> Command {
    let mut c = Command::new(&binaries().coordinator);
    c.args(args).env("RUST_LOG", "warn");
    c
}

/// `worker --coordinator http://127.0.0.1:PORT --data-dir DATA` plus `args`, with a spool
/// directory of its own under the system's temporary directory.
pub fn worker(port: u16, args: &[&str]) -> Command {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let spool = std::env::temp_dir().join(format!("lvm-test-spool-{}-{n}", std::process::id()));
    worker_spooling(port, &spool, args)
}

/// `worker --coordinator http://127.0.0.1:PORT --data-dir DATA --spool-dir SPOOL` plus `args`.
pub fn worker_spooling(port: u16, spool: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(&binaries().worker);
    c.arg("--coordinator")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir())
        .arg("--spool-dir")
        .arg(spool)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "warn");
    c
}

/// A TCP proxy on 127.0.0.1 in front of `target` that can cut every connection and refuse
/// new ones (a network partition), then heal.
#[derive(Debug)]
pub struct Proxy {
    /// The port workers connect to.
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    streams: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    /// Starts forwarding to 127.0.0.1:`target`.
    pub fn start(target: u16) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").expect("a proxy port");
        let port = listener.local_addr().expect("bound").port();
        let open = Arc::new(AtomicBool::new(true));
        let streams: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (open2, streams2) = (open.clone(), streams.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !open2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let pipes = [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ];
                streams2.lock().unwrap().extend([client, server]);
                for pipe in pipes {
                    if let (Ok(mut from), Ok(mut to)) = pipe {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        Self {
            port,
            open,
            streams,
        }
    }

    /// Cuts every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The output of `coordinator status --db DB`.
pub fn status(db: &Path) -> String {
    let out = Command::new(&binaries().coordinator)
        .arg("status")
        .arg("--db")
        .arg(db)
        .output()
        .expect("running coordinator status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `coordinator --sweep SWEEP --db DB --listen 127.0.0.1:0` plus `extra`, waits until
/// it listens, and returns it with its port.
pub fn serve(sweep: &Path, db: &Path, extra: &[&str]) -> (Proc, u16) {
    let (sweep, db) = (sweep.display().to_string(), db.display().to_string());
    let mut args = vec!["--sweep", &sweep, "--db", &db, "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut proc = Proc::spawn(coordinator(&args));
    let line = proc.wait_for_line("listening on", Duration::from_secs(60));
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    (proc, port)
}

/// Writes `DIR/NAME.yaml`: a sweep of one experiment, seed 1, and returns its path.
pub fn sweep_file(
    dir: &Path,
    name: &str,
    defaults: &str,
    task: &str,
    estimators: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    let text = format!(
        "name: {name}\ndefaults: {defaults}\nexperiments:\n  - task: {task}\n    seeds: [1]\n    \
         estimators: {estimators}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}
