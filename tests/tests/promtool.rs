//! The metrics as a fleet reads them: a scrape passes `promtool check metrics`, a real
//! Prometheus server scrapes memtrace and its query API returns the fixture's leak and
//! the time to the cgroup limit, and the example alert rules pass `promtool check rules`
//! and their own `promtool test rules` cases. (Debian's `prometheus` package, installed
//! by `cargo xtask setup`, brings both programs.)

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    MIB, MemoryCgroup, Memtrace, StartGate, TestProcess, build_c_fixture, require_root, workspace_root,
};
use serde_json::Value;

fn require_program(name: &str) {
    let found = Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "{name} is not installed: `cargo xtask setup` installs Debian's prometheus package");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// `GET path` on a loopback port; the body.
fn get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    assert!(response.starts_with("HTTP/1.1 200"), "GET {path}: {response}");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write to promtool");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait for promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn example_alert_rules_are_valid_and_fire_as_tested() {
    require_program("promtool");
    let dir = workspace_root().join("examples/prometheus");
    let rules = dir.join("memtrace-rules.yml");
    let (ok, text) = promtool(&["check", "rules", rules.to_str().expect("utf-8 path")], None);
    assert!(ok && text.contains("SUCCESS: 5 rules found"), "{text}");
    let tests = dir.join("memtrace-rules.test.yml");
    let (ok, text) = promtool(&["test", "rules", tests.to_str().expect("utf-8 path")], None);
    assert!(ok && text.contains("SUCCESS"), "{text}");
}

/// A Prometheus server scraping `target_port` every second, killed on drop.
struct Prometheus {
    child: std::process::Child,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, target_port: u16) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: memtrace\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus");
        Self { child, port }
    }

    /// The instant query's result vector.
    fn query(&self, query: &str) -> Vec<Value> {
        let encoded: String = query
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"_-.".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let body = get(self.port, &format!("/api/v1/query?query={encoded}"));
        let json: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("query {query}: {e}: {body}"));
        assert_eq!(json["status"], "success", "query {query}: {body}");
        json["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls `query` until `pred` holds for its result.
    fn wait_for(&self, query: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let ready = TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            let result = if ready { self.query(query) } else { Vec::new() };
            if pred(&result) {
                return result;
            }
            assert!(started.elapsed() < timeout, "Prometheus: {query} gave {result:?} after {timeout:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Child::kill signals this child's pid only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

#[test]
fn prometheus_scrapes_the_leak_and_the_time_to_the_limit() {
    if !require_root("prometheus_scrapes_the_leak_and_the_time_to_the_limit") {
        return;
    }
    require_program("promtool");
    require_program("prometheus");
    let cgroup = MemoryCgroup::new("promtool", 512 * MIB)
        .unwrap_or_else(|| panic!("this test needs a memory cgroup controller (v1 or v2)"));
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("mmap_leak", dir.path());
    let gate = StartGate::new(dir.path());
    // 1 MiB every 50 ms for 15 s: 300 MiB in a 512 MiB cgroup.
    let mut cmd = Command::new(&bin);
    cmd.arg("300").arg(gate.path());
    let mut fixture = TestProcess::spawn("mmap_leak", cmd);
    fixture.wait_for_stdout("waiting", Duration::from_secs(10));
    cgroup.add(fixture.pid());

    let port = free_port();
    let (pid, addr) = (fixture.pid().to_string(), format!(":{port}"));
    let mut memtrace =
        Memtrace::spawn(["attach", &pid, "--duration", "40s", "--interval", "1s", "--metrics", &addr]);
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    let prometheus = Prometheus::start(dir.path(), port);
    gate.open();

    // While the leak runs the time to the limit is a gauge: 512 MiB at 20 MiB/s.
    let ttl =
        prometheus.wait_for("memtrace_time_to_limit_seconds", Duration::from_secs(30), |r| !r.is_empty());
    let seconds = value(&ttl[0]);
    assert!(seconds > 0.0 && seconds < 120.0, "time to the limit {seconds} s at 20 MiB/s: {ttl:?}");
    assert_eq!(ttl[0]["metric"]["pid"], pid.as_str(), "{ttl:?}");
    let body = get(port, "/metrics");
    let (ok, lint) = promtool(&["check", "metrics"], Some(&body));
    assert!(ok && lint.trim().is_empty(), "promtool check metrics on a scrape:\n{lint}\n{body}");

    fixture.wait_for_stdout("done", Duration::from_secs(30));
    let query = "memtrace_suspect_bytes{source=\"mmap\"}";
    let leak = prometheus.wait_for(query, Duration::from_secs(20), |r| {
        r.iter().any(|s| {
            s["metric"]["culprit"].as_str().is_some_and(|c| c.contains("leak_mappings"))
                && value(s) >= 300.0 * MIB as f64
        })
    });
    eprintln!("Prometheus: {leak:?}");
    // Every query of the example dashboard runs, and its panels have data.
    let dashboard = workspace_root().join("examples/grafana/memtrace-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(|e| e.replace("$pid", ".*")))
        .collect();
    assert!(exprs.len() >= 7, "{exprs:?}");
    let empty: Vec<&String> = exprs.iter().filter(|e| prometheus.query(e).is_empty()).collect();
    // The cgroup panels have data (the fixture runs in one); time to the limit is gone
    // once the leak stops.
    assert!(
        empty.iter().all(|e| e.contains("memtrace_time_to_limit_seconds")),
        "dashboard queries without data: {empty:?}"
    );
    let growth = prometheus.query("memtrace_memory_growth_bytes_per_second");
    assert!(
        growth.iter().any(|s| s["metric"]["basis"] == "memcg"),
        "the fitted rate is against the cgroup: {growth:?}"
    );
    // SAFETY: signals the memtrace process this test spawned, by its pid.
    unsafe { libc::kill(memtrace.pid().cast_signed(), libc::SIGINT) };
    let out = memtrace.wait(Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.combined());
    drop(prometheus);
    drop(fixture);
    drop(cgroup);
}
