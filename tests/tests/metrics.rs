//! `--metrics`: a Prometheus scrape during a trace shows the leak as it grows.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{MIB, Memtrace, StartGate, TestProcess, build_c_fixture, require_root};

fn scrape(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    response
}

fn value(body: &str, prefix: &str) -> Option<u64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn prometheus_scrape_shows_the_leak() {
    if !require_root("prometheus_scrape_shows_the_leak") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("mmap_leak", dir.path());
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(&bin);
    cmd.arg("40").arg(gate.path());
    let mut fixture = TestProcess::spawn("mmap_leak", cmd);
    fixture.wait_for_stdout("waiting", Duration::from_secs(10));

    // A port that was free a moment ago.
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let pid = fixture.pid().to_string();
    let addr = format!(":{port}");
    let mut memtrace = Memtrace::spawn(["attach", &pid, "--duration", "20s", "--metrics", &addr]);
    memtrace.wait_for_stderr("metrics at http://127.0.0.1", Duration::from_secs(30));
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    gate.open();
    fixture.wait_for_stdout("done", Duration::from_secs(20));

    // The model is updated as events arrive: poll until the whole leak is visible.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let response = scrape(port, "/metrics");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let mapped = value(&response, "memtrace_mapped_outstanding_bytes{").unwrap_or(0);
        if mapped >= 40 * MIB || Instant::now() > deadline {
            break response;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.contains("text/plain; version=0.0.4"), "{body}");
    assert_eq!(value(&body, "memtrace_mapped_outstanding_bytes{"), Some(40 * MIB), "{body}");
    assert!(
        body.lines()
            .any(|l| l.starts_with("memtrace_suspect_bytes{") && l.contains("culprit=\"leak_mappings")),
        "the leaking function is a labelled suspect\n{body}"
    );
    assert_eq!(value(&body, "memtrace_lost_events_total{"), Some(0), "{body}");
    assert!(scrape(port, "/").starts_with("HTTP/1.1 404"), "only /metrics is served");
    // SAFETY: signals the memtrace process this test spawned, by its pid.
    unsafe { libc::kill(memtrace.pid().cast_signed(), libc::SIGINT) };
    let out = memtrace.wait(Duration::from_secs(30));
    assert!(out.status.success(), "memtrace exits cleanly on Ctrl-C\n{}", out.combined());
    assert!(out.stdout.contains("leak_mappings"), "and still prints its report\n{}", out.combined());
}
