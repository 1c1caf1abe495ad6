//! `--pyroscope URL`: the profile arrives at a Pyroscope ingest endpoint as Pyroscope
//! reads it. Pyroscope cannot be installed here, so a loopback server in this test takes
//! its place and decodes what it receives the way Pyroscope's `/ingest` handler does
//! (query name and labels, a multipart body with `profile` and `sample_type_config`, the
//! profile gzipped pprof); a failing endpoint is counted, never fatal; and TLS goes
//! through rustls to an `openssl s_server` trusted via `SSL_CERT_FILE`.
//!
//! `--otlp-profiles URL` is checked the same way: a loopback server stands in for an
//! OpenTelemetry collector and decodes the requests with `opentelemetry-proto`'s
//! generated definitions.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::mpsc,
    time::Duration,
};

use flate2::read::GzDecoder;
use integration_tests::{MIB, Memtrace, Report, StartGate, TestProcess, build_c_fixture, require_root};
use memtrace::export::pprof::proto::Profile;
use prost::Message as _;
use serde_json::Value;

/// One request as the server read it.
#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii escape");
                out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).expect("UTF-8 query")
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(len) = headers.get("content-length").and_then(|l| l.parse::<usize>().ok()) {
        body.resize(len, 0);
        reader.read_exact(&mut body).ok()?;
    } else if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    Some(Request { method, path: path.to_string(), query, headers, body })
}

/// An HTTP server on a loopback port that answers every request with `status` and
/// `reply`, and hands each request to the test.
fn serve(status: &'static str, reply: &'static str) -> (u16, mpsc::Receiver<Request>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let port = listener.local_addr().expect("local address").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some(request) = read_request(&mut stream) else { continue };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
            if tx.send(request).is_err() {
                break;
            }
        }
    });
    (port, rx)
}

/// The multipart parts by name, as Go's `multipart.Reader` reads them.
fn parts(request: &Request) -> HashMap<String, Vec<u8>> {
    let content_type = request.headers.get("content-type").expect("a Content-Type");
    assert!(content_type.starts_with("multipart/form-data"), "a multipart body: {content_type}");
    let boundary = content_type.split("boundary=").nth(1).expect("a boundary").trim_matches('"');
    let delimiter = format!("--{boundary}");
    let body = &request.body;
    let mut out = HashMap::new();
    let positions: Vec<usize> = body
        .windows(delimiter.len())
        .enumerate()
        .filter(|(_, w)| *w == delimiter.as_bytes())
        .map(|(i, _)| i)
        .collect();
    for pair in positions.windows(2) {
        let part = &body[pair[0] + delimiter.len()..pair[1]];
        let split = part.windows(4).position(|w| w == b"\r\n\r\n").expect("part headers end");
        let head = String::from_utf8_lossy(&part[..split]);
        let name = head.split("name=\"").nth(1).and_then(|r| r.split('"').next()).expect("a part name");
        // The content ends before the CRLF that precedes the next delimiter.
        let content = &part[split + 4..part.len() - 2];
        out.insert(name.to_string(), content.to_vec());
    }
    out
}

fn decode_profile(gz: &[u8]) -> Profile {
    let mut raw = Vec::new();
    GzDecoder::new(gz).read_to_end(&mut raw).expect("the profile part is gzip");
    Profile::decode(raw.as_slice()).expect("the profile part is a pprof Profile")
}

fn string(profile: &Profile, i: i64) -> &str {
    &profile.string_table[usize::try_from(i).expect("string index")]
}

/// `inuse_space` of the samples whose stack names `function`.
fn inuse_space_of(profile: &Profile, function: &str) -> i64 {
    let column = profile
        .sample_type
        .iter()
        .position(|t| string(profile, t.r#type) == "inuse_space")
        .expect("an inuse_space column");
    let names = |location_id: u64| {
        let location = &profile.location[usize::try_from(location_id - 1).expect("id")];
        location.line.iter().map(|l| {
            let f = &profile.function[usize::try_from(l.function_id - 1).expect("id")];
            string(profile, f.name).to_string()
        })
    };
    profile
        .sample
        .iter()
        .filter(|s| s.location_id.iter().any(|&id| names(id).any(|n| n == function)))
        .map(|s| s.value[column])
        .sum()
}

struct Fixture {
    _dir: tempfile::TempDir,
    process: TestProcess,
    gate: StartGate,
    json: std::path::PathBuf,
}

/// The mmap fixture: `leak_mappings` keeps 40 MiB over 2 s.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("create temp dir");
    let bin = build_c_fixture("mmap_leak", dir.path());
    let gate = StartGate::new(dir.path());
    let mut cmd = Command::new(&bin);
    cmd.arg("40").arg(gate.path());
    let mut process = TestProcess::spawn("mmap_leak", cmd);
    process.wait_for_stdout("waiting", Duration::from_secs(10));
    let json = dir.path().join("report.json");
    Fixture { _dir: dir, process, gate, json }
}

/// `memtrace attach` for 6 s pushing to `url` every second, with `flag` (`--pyroscope`
/// or `--otlp-profiles`).
fn trace(fx: &mut Fixture, flag: &str, url: &str, env: &[(&str, &str)]) -> integration_tests::RunOutput {
    let pid = fx.process.pid().to_string();
    let json = fx.json.to_str().expect("utf-8 temp path").to_string();
    let args = [
        "attach",
        &pid,
        "--duration",
        "6s",
        "--interval",
        "1s",
        "--json",
        &json,
        flag,
        url,
        "--label",
        "team=memory",
        "--label",
        "env=ci",
    ];
    let mut memtrace = Memtrace::spawn_with_env(args, env.iter().copied());
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    fx.gate.open();
    let out = memtrace.wait(Duration::from_mins(1));
    assert!(out.status.success(), "a push never makes the trace fail\n{}", out.combined());
    out
}

#[test]
fn profiles_arrive_as_pyroscope_reads_them() {
    if !require_root("profiles_arrive_as_pyroscope_reads_them") {
        return;
    }
    let (port, received) = serve("200 OK", "");
    let mut fx = fixture();
    let out = trace(
        &mut fx,
        "--pyroscope",
        &format!("http://127.0.0.1:{port}"),
        &[("MEMTRACE_PYROSCOPE_TOKEN", "s3cret")],
    );
    let requests: Vec<Request> = received.try_iter().collect();
    // One a second for 6 s, and the final one.
    assert!(requests.len() >= 4, "{} pushes\n{}", requests.len(), out.combined());
    assert!(
        out.stderr.contains(&format!("pyroscope: {} pushed, 0 failed", requests.len())),
        "{}",
        out.combined()
    );
    let mut previous_until = 0;
    for r in &requests {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/ingest"));
        assert_eq!(
            r.query["name"], "mmap_leak{env=ci,team=memory}",
            "service_name is the comm, labels sorted"
        );
        assert_eq!(r.query.get("spyName").map(String::as_str), Some("memtrace"));
        assert!(!r.query.contains_key("format"), "Pyroscope reads a multipart body only without format=");
        let (from, until): (u64, u64) =
            (r.query["from"].parse().expect("from"), r.query["until"].parse().expect("until"));
        assert!(
            from < until && from >= previous_until,
            "consecutive ranges: {from}..{until} after {previous_until}"
        );
        assert_eq!(r.query["from"].len(), 10, "Unix seconds");
        previous_until = until;
        assert_eq!(r.headers.get("authorization").map(String::as_str), Some("Bearer s3cret"));
    }

    let last = requests.last().expect("a push");
    let last_parts = parts(last);
    let config: Value =
        serde_json::from_slice(&last_parts["sample_type_config"]).expect("sample_type_config is JSON");
    assert_eq!(config["inuse_space"]["units"], "bytes", "{config}");
    assert_eq!(config["inuse_space"]["aggregation"], "average", "held bytes are a gauge: {config}");
    assert_eq!(config["inuse_objects"]["units"], "objects", "{config}");
    let profile = decode_profile(&last_parts["profile"]);
    let types: Vec<(&str, &str)> =
        profile.sample_type.iter().map(|t| (string(&profile, t.r#type), string(&profile, t.unit))).collect();
    assert!(
        types.contains(&("inuse_space", "bytes")) && types.contains(&("mapped_space", "bytes")),
        "{types:?}"
    );
    for (ty, _) in &types {
        assert!(config.get(*ty).is_some(), "sample_type_config covers {ty}: {config}");
    }
    let leaked = inuse_space_of(&profile, "leak_mappings");
    let expected = i64::try_from(40 * MIB).expect("fits");
    assert!(
        leaked >= expected * 95 / 100 && leaked <= expected + i64::try_from(MIB).expect("fits"),
        "leak_mappings holds {leaked} bytes in the last pushed profile, expected 40 MiB"
    );
    // An early push already shows the leak growing: the trace streams, not only its end.
    let first_with_leak = requests
        .iter()
        .position(|r| inuse_space_of(&decode_profile(&parts(r)["profile"]), "leak_mappings") > 0);
    assert!(
        first_with_leak.is_some_and(|i| i + 1 < requests.len()),
        "the leak appears before the final push"
    );
    drop(fx);
}

#[test]
fn a_failing_endpoint_is_counted_and_reported() {
    if !require_root("a_failing_endpoint_is_counted_and_reported") {
        return;
    }
    let (port, received) = serve("500 Internal Server Error", "ingester down");
    let mut fx = fixture();
    let out = trace(&mut fx, "--pyroscope", &format!("http://127.0.0.1:{port}"), &[]);
    let tries = received.try_iter().count();
    assert!(tries >= 4, "{tries} pushes tried");
    let said =
        format!("pyroscope: 0 pushed, {tries} failed (last: HTTP 500 Internal Server Error: ingester down)");
    assert!(out.stderr.contains(&said), "{said:?} in\n{}", out.combined());
    let report = Report::read(&fx.json);
    let warnings = report.json["warnings"].to_string();
    assert!(warnings.contains("pyroscope: 0 pushed"), "the report's warnings say so: {warnings}");
    assert!(out.stdout.contains("leak_mappings"), "and the report is whole\n{}", out.combined());
}

#[test]
fn otlp_profiles_arrive_as_a_collector_reads_them() {
    use opentelemetry_proto::tonic::{
        collector::profiles::v1development::ExportProfilesServiceRequest, common::v1::any_value::Value as Any,
    };
    if !require_root("otlp_profiles_arrive_as_a_collector_reads_them") {
        return;
    }
    let (port, received) = serve("200 OK", "");
    let mut fx = fixture();
    let env = [("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20s3cret")];
    let out = trace(&mut fx, "--otlp-profiles", &format!("http://127.0.0.1:{port}/"), &env);
    let requests: Vec<Request> = received.try_iter().collect();
    assert!(requests.len() >= 4, "{} pushes\n{}", requests.len(), out.combined());
    assert!(out.stderr.contains(&format!("otlp: {} pushed, 0 failed", requests.len())), "{}", out.combined());
    // Bytes the leaking function holds in the mapped view of one request.
    let leaked = |r: &Request| -> i64 {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v1development/profiles"));
        assert_eq!(r.headers.get("content-type").map(String::as_str), Some("application/x-protobuf"));
        assert_eq!(r.headers.get("authorization").map(String::as_str), Some("Bearer s3cret"));
        let req =
            ExportProfilesServiceRequest::decode(r.body.as_slice()).expect("an ExportProfilesServiceRequest");
        let d = req.dictionary.expect("a dictionary");
        let string = |i: i32| d.string_table[usize::try_from(i).expect("index")].as_str();
        assert_eq!(string(0), "", "string_table[0] is empty");
        let rp = &req.resource_profiles[0];
        let attr = |key: &str| {
            rp.resource
                .as_ref()
                .expect("resource")
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.as_ref().and_then(|v| v.value.clone()))
        };
        assert_eq!(
            attr("service.name"),
            Some(Any::StringValue("mmap_leak".into())),
            "service.name is the comm"
        );
        assert_eq!(attr("team"), Some(Any::StringValue("memory".into())), "labels are resource attributes");
        assert_eq!(attr("process.pid"), Some(Any::IntValue(i64::from(fx.process.pid()))));
        let profiles = &rp.scope_profiles[0].profiles;
        let mapped = profiles
            .iter()
            .find(|p| p.sample_type.as_ref().is_some_and(|t| string(t.type_strindex) == "mapped_space"))
            .expect("a profile of the mapped view");
        assert_eq!(string(mapped.sample_type.as_ref().map_or(0, |t| t.unit_strindex)), "bytes");
        mapped
            .samples
            .iter()
            .filter(|s| {
                let stack = &d.stack_table[usize::try_from(s.stack_index).expect("index")];
                stack.location_indices.iter().any(|&l| {
                    let location = &d.location_table[usize::try_from(l).expect("index")];
                    location.lines.iter().any(|line| {
                        let f = &d.function_table[usize::try_from(line.function_index).expect("index")];
                        string(f.name_strindex) == "leak_mappings"
                    })
                })
            })
            .map(|s| s.values.iter().sum::<i64>())
            .sum()
    };
    let last = leaked(requests.last().expect("a push"));
    let expected = i64::try_from(40 * MIB).expect("fits");
    assert!(
        last >= expected * 95 / 100 && last <= expected + i64::try_from(MIB).expect("fits"),
        "leak_mappings holds {last} bytes in the last OTLP profile, expected 40 MiB"
    );
    let first_with_leak = requests.iter().position(|r| leaked(r) > 0);
    assert!(
        first_with_leak.is_some_and(|i| i + 1 < requests.len()),
        "the leak appears before the final push"
    );
    drop(fx);
}

/// `openssl s_server`, killed on drop. Its stdin stays open (on end of input it would
/// close the connection); with `-quiet` it writes what a client sends, decrypted, to stdout.
struct TlsServer {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl TlsServer {
    fn start(port: u16, cert: &Path, key: &Path) -> Self {
        let mut child = Command::new("openssl")
            .args(["s_server", "-quiet", "-accept", &format!("127.0.0.1:{port}"), "-cert"])
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("run openssl s_server: {e} (`cargo xtask setup` installs openssl)"));
        let stdout = child.stdout.take().expect("s_server stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Listening once it accepts a TCP connection.
        for _ in 0..50 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, lines }
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("openssl s_server did not receive {needle:?}: {e}"),
            }
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        // Child::kill signals this child's pid only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run openssl: {e} (`cargo xtask setup` installs it)"));
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`ca.pem`, what a client trusts) and a server certificate for 127.0.0.1 signed by
/// it (`server.pem`, `server.key`), in `dir`. (A self-signed certificate will not do:
/// rustls refuses a CA certificate as the server's own.)
fn certificates(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    openssl(
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=memtrace test CA"]
            .into_iter()
            .chain(["-keyout", "ca.key", "-out", "ca.pem"])
            .collect::<Vec<_>>(),
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        dir,
    );
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write the extensions");
    openssl(
        &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]
            .into_iter()
            .chain(["-days", "1", "-extfile", "server.ext", "-out", "server.pem"])
            .collect::<Vec<_>>(),
        dir,
    );
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

#[test]
fn https_goes_through_rustls_with_the_trusted_certificates() {
    if !require_root("https_goes_through_rustls_with_the_trusted_certificates") {
        return;
    }
    let dir = tempfile::tempdir().expect("create temp dir");
    let (ca, cert, key) = certificates(dir.path());
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let server = TlsServer::start(port, &cert, &key);
    let url = format!("https://127.0.0.1:{port}");

    // Not among the system's CA certificates: the handshake fails and says why.
    let mut fx = fixture();
    let out = trace(&mut fx, "--pyroscope", &url, &[]);
    assert!(out.stderr.contains("pyroscope: 0 pushed"), "{}", out.combined());
    assert!(out.stderr.to_lowercase().contains("certificate"), "a certificate error\n{}", out.combined());
    drop(fx);

    // Trusted: the server reads the request in clear.
    let fx = fixture();
    let ca = ca.to_str().expect("utf-8 temp path");
    let pid = fx.process.pid().to_string();
    let args = ["attach", &pid, "--duration", "3s", "--interval", "1s", "--pyroscope", &url];
    let mut memtrace = Memtrace::spawn_with_env(args, [("SSL_CERT_FILE", ca)]);
    memtrace.wait_for_stderr("attached", Duration::from_secs(30));
    fx.gate.open();
    let line = server.wait_for("POST /ingest?name=mmap_leak", Duration::from_secs(20));
    assert!(line.contains("spyName=memtrace"), "{line}");
    // s_server never answers: the pushes time out, counted, and the trace still ends.
    let out = memtrace.wait(Duration::from_mins(1));
    assert!(out.status.success(), "{}", out.combined());
}
