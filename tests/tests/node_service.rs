//! Continuous tracing of a real Node.js HTTP service (the bundled Express example) under
//! `wrk` load, started with no flag (no perf map): the JavaScript function that leaks must
//! be named, with its file and line, in the top suspect's stack of native memory.

use std::{process::Command, time::Duration};

use integration_tests::{Memtrace, TestProcess, node_bin, perf_map_path, require_root, workspace_root};
use serde_json::Value;

/// The first leaks, a line each (bytes, verdict, score, JS frames), for failure messages.
fn describe_leaks(leaks: &[Value]) -> String {
    leaks
        .iter()
        .take(6)
        .map(|l| {
            let frames: Vec<&str> = l["frames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|f| f["kind"] == "js")
                .filter_map(|f| f["function"].as_str())
                .collect();
            format!("{} B {} {} js={frames:?}", l["bytes"], l["verdict"], l["score"])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn leaking_js_function_is_the_top_suspect_under_load() {
    if !require_root("leaking_js_function_is_the_top_suspect_under_load") {
        return;
    }
    let service = workspace_root().join("examples/leaky-service");
    assert!(
        service.join("node_modules/express").is_dir(),
        "examples/leaky-service has no node_modules: run `cargo xtask setup` (npm install)"
    );
    let Ok(wrk) = which_wrk() else {
        panic!("wrk is not installed: run `cargo xtask setup`");
    };
    let dir = tempfile::tempdir().expect("create temp dir");
    let mut cmd = Command::new(node_bin());
    cmd.arg("server.js").current_dir(&service).env("PORT", "0").env("LEAK_CAP_MB", "1500");
    let mut node = TestProcess::spawn("leaky-service", cmd);
    node.remove_on_drop(perf_map_path(node.pid()));
    let line = node.wait_for_stdout("listening on", Duration::from_secs(30));
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).expect("service URL").to_string();

    let json = dir.path().join("report.json");
    let pid = node.pid().to_string();
    let mut memtrace = Memtrace::spawn([
        "attach",
        &pid,
        "--duration",
        "20s",
        "--interval",
        "1s",
        "--json",
        json.to_str().expect("utf-8"),
    ]);
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    let load = Command::new(wrk)
        .args(["-t2", "-c16", "-d19s", "-s"])
        .arg(service.join("load.lua"))
        .arg(&url)
        .env("ORDER_EVERY", "200")
        .output()
        .expect("run wrk");
    assert!(load.status.success(), "wrk failed: {}", String::from_utf8_lossy(&load.stderr));
    // What the service itself counted (orders placed, bytes kept), for the failure messages.
    let stats = http_get(&url, "/stats");
    let out = memtrace.wait(Duration::from_mins(1));
    assert!(out.status.success(), "memtrace attach exited with {}\n{}", out.status, out.combined());

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("read report")).expect("JSON");
    let leaks = report["leaks"].as_array().expect("leaks");
    let describe = describe_leaks(leaks);
    eprintln!("{}\n{describe}", String::from_utf8_lossy(&load.stdout));
    let others: Vec<String> = report["other_suspects"]
        .as_array()
        .into_iter()
        .flatten()
        .take(6)
        .map(|l| format!("{} B {} {} {}", l["bytes"], l["verdict"], l["culprit"]["function"], l["reason"]))
        .collect();
    let top = leaks.first().unwrap_or_else(|| {
        panic!(
            "nothing flagged; the service says {stats}; other suspects:\n{}\n--- memtrace ---\n{}",
            others.join("\n"),
            out.stderr
        )
    });
    let source = std::fs::read_to_string(service.join("server.js")).expect("read server.js");
    let line =
        source.lines().position(|l| l.starts_with("function rememberOrder(")).expect("rememberOrder") + 1;
    assert!(!perf_map_path(node.pid()).exists(), "node without flags wrote a perf map");
    // Named from V8's heap in the stacks of the mapped memory (the receipts): the
    // function, its file and the line it starts on.
    let names_it = top["variants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["source"] == "mmap")
        .flat_map(|v| v["frames"].as_array().into_iter().flatten())
        .any(|f| {
            f["function"] == "rememberOrder"
                && f["kind"] == "js"
                && f["file"].as_str().is_some_and(|p| p.ends_with("leaky-service/server.js"))
                && f["line"] == line
        });
    assert!(
        names_it,
        "the top suspect's stack does not name rememberOrder server.js:{line} (the service says {stats}):\n{describe}"
    );
    assert_eq!(
        top["verdict"], "leak",
        "the service says {stats}\n{describe}\n--- memtrace ---\n{}",
        out.stderr
    );
    assert_eq!(report["lost_events"], 0, "events were lost under load");
}

/// The body of `GET path` from the service at `url` (`http://host:port`), or why not.
fn http_get(url: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let get = || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.split_once("\r\n\r\n").map_or(response.clone(), |(_, body)| body.to_string()))
    };
    get().unwrap_or_else(|e| format!("(GET {path}: {e})"))
}

fn which_wrk() -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("wrk"))
        .find(|p| p.is_file())
        .ok_or(())
}
