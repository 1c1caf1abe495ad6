//! The pieces the demo and the benchmark share: the bundled leaky service, the load
//! generator (wrk) and a memtrace run.

use std::{
    ffi::OsStr,
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::proc::{self, Lines, Owned, step};

const HOST: &str = "127.0.0.1";

pub fn example_dir() -> PathBuf {
    proc::workspace_root().join("examples").join("leaky-service")
}

/// `out/` at the workspace root (git-ignored), created if missing.
pub fn out_dir() -> Result<PathBuf> {
    let dir = proc::workspace_root().join("out");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// What every task that traces the example service does first: refuse without root, run
/// `cargo xtask setup` (unless `no_setup`), build memtrace, and make `out/<subdir>` (`out/`
/// itself when `subdir` is empty). Returns memtrace's path and that directory.
pub fn prepare(task: &str, no_setup: bool, subdir: &str) -> Result<(PathBuf, PathBuf)> {
    require_root(task)?;
    if !no_setup {
        crate::setup::run()?;
    }
    let bin = build_memtrace()?;
    let out = out_dir()?.join(subdir);
    fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    Ok((bin, out))
}

pub fn require_root(task: &str) -> Result<()> {
    if proc::is_root() {
        Ok(())
    } else {
        bail!("{task} runs memtrace, which loads BPF programs: run it as root (sudo -E cargo xtask ...)")
    }
}

/// Builds the release `memtrace` and returns its path; `$MEMTRACE_BIN` names another
/// binary to use instead (nothing is built then).
pub fn build_memtrace() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("MEMTRACE_BIN") {
        let bin = PathBuf::from(bin);
        step(&format!("using memtrace from MEMTRACE_BIN: {}", bin.display()));
        if !bin.is_file() {
            bail!("MEMTRACE_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    step("build memtrace (release)");
    proc::run(proc::cargo().args(["build", "--release", "-p", "tracer"])).context("build memtrace")?;
    let bin = proc::target_dir().join("release").join("memtrace");
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// The bundled Express service, stopped (by its pid) when dropped.
pub struct Service {
    proc: Owned,
    pub port: u16,
    work_dir: PathBuf,
    _stdout: Lines,
}

impl Service {
    /// Starts `examples/leaky-service` on a free port, as people run it: with no flag
    /// (memtrace names its JS frames from V8's heap). `work_dir` is its working directory.
    pub fn start(work_dir: &Path) -> Result<Self> {
        Self::start_with_env(work_dir, &[])
    }

    /// As [`Service::start`], with more environment variables (e.g. `LEAK_CAP_MB`).
    pub fn start_with_env(work_dir: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let dir = example_dir();
        if !dir.join("node_modules").is_dir() {
            bail!("{}/node_modules is missing: run `cargo xtask setup`", dir.display());
        }
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("server.js"))
            .env("PORT", "0")
            .env("HOST", HOST)
            .envs(env.iter().copied())
            .current_dir(work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc = Owned::spawn("leaky-service", &mut cmd)?;
        let stdout = proc.child_mut()?.stdout.take().context("leaky-service: no stdout pipe")?;
        let lines = Lines::spawn(stdout, Some("    service: "));
        let line = lines.wait_for("listening on", Duration::from_secs(30), "leaky-service")?;
        let port = line
            .split(&format!("{HOST}:"))
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|port| port.parse().ok())
            .with_context(|| format!("no port in the service's line {line:?}"))?;
        Ok(Self { proc, port, work_dir: work_dir.to_path_buf(), _stdout: lines })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn url(&self) -> String {
        format!("http://{HOST}:{}/", self.port)
    }

    /// The body of `GET /stats` (orders kept, leaked bytes, RSS), if the service answers.
    pub fn stats(&self) -> Option<String> {
        let mut stream = TcpStream::connect((HOST, self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET /stats HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split("\r\n\r\n").nth(1).map(|body| body.trim().to_owned())
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let pid = self.pid();
        self.proc.kill();
        // node --perf-basic-prof leaves its perf map and V8 logs behind.
        let _ = fs::remove_file(format!("/tmp/perf-{pid}.map"));
        let suffix = format!("-{pid}-v8.log");
        if let Ok(entries) = fs::read_dir(&self.work_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("isolate-") && name.ends_with(&suffix) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Load-generator settings.
pub struct Load {
    pub threads: u32,
    pub connections: u32,
    pub duration_s: u32,
    /// One request in this many places an order (`load.lua`'s `ORDER_EVERY`); `None`:
    /// the script's default, 120.
    pub order_every: Option<u32>,
}

pub struct WrkResult {
    pub requests_per_s: f64,
    pub output: String,
}

/// Runs wrk with the example's traffic mix (`load.lua`) against `url`.
pub fn wrk(url: &str, load: &Load) -> Result<WrkResult> {
    let out = wrk_command(url, load)
        .stdin(Stdio::null())
        .output()
        .context("run wrk (install it with `cargo xtask setup`)")?;
    let output = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed ({}):\n{output}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let requests_per_s =
        parse_rps(&output).with_context(|| format!("no `Requests/sec:` in wrk's output:\n{output}"))?;
    for line in output.lines() {
        let line = line.trim();
        if line.starts_with("Socket errors") || line.starts_with("Non-2xx") {
            eprintln!("xtask: warning: wrk: {line}");
        }
    }
    Ok(WrkResult { requests_per_s, output })
}

/// The wrk command line for the example's traffic mix (`load.lua`) against `url`.
pub fn wrk_command(url: &str, load: &Load) -> Command {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.duration_s))
        .arg("-s")
        .arg(example_dir().join("load.lua"))
        .arg(url);
    if let Some(every) = load.order_every {
        cmd.env("ORDER_EVERY", every.to_string());
    }
    cmd
}

/// `Requests/sec:` of wrk's output.
pub fn parse_rps(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A running `memtrace attach`, its status lines echoed to stderr.
pub struct Tracer {
    pub proc: Owned,
    _stderr: Lines,
}

impl Tracer {
    /// Starts `memtrace attach <pid> <args>` and waits until it says it is attached.
    pub fn attach<S: AsRef<OsStr>>(bin: &Path, pid: u32, args: &[S], stdout: Stdio) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("attach")
            .arg(pid.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        let mut proc = Owned::spawn("memtrace", &mut cmd)?;
        let stderr = proc.child_mut()?.stderr.take().context("memtrace: no stderr pipe")?;
        let lines = Lines::spawn(stderr, Some("    "));
        if let Err(err) = lines.wait_for("attached", Duration::from_mins(1), "memtrace") {
            let status = proc.wait(Duration::from_secs(5))?;
            return Err(err.context(format!("memtrace attach {pid} did not start tracing ({status})")));
        }
        Ok(Self { proc, _stderr: lines })
    }
}
