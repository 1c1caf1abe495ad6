//! `cargo xtask demo`: the README's story on the bundled service. Start the leaky Express
//! service, attach memtrace, drive traffic with wrk, print memtrace's report.

use std::{fs, process::Stdio, time::Duration};

use anyhow::{Result, bail};

use crate::{
    proc::{note, step},
    service::{self, Load, Service, Tracer},
};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of load; memtrace traces 2 s longer, so that all of it is seen.
    #[arg(long, default_value_t = 20)]
    duration: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    no_setup: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let (bin, out) = service::prepare("the demo", args.no_setup, "")?;
    let json = out.join("demo-report.json");
    let svg = out.join("demo-flamegraph.svg");
    for stale in [&json, &svg] {
        let _ = fs::remove_file(stale);
    }

    step("start examples/leaky-service (node server.js, no flag)");
    let service = Service::start(&out)?;
    note(&format!("pid {} at {}", service.pid(), service.url()));

    let trace_s = args.duration + 2;
    step(&format!("attach memtrace to pid {} for {trace_s}s", service.pid()));
    let duration = format!("{trace_s}s");
    let trace_args = [
        "--duration".as_ref(),
        duration.as_ref(),
        "--json".as_ref(),
        json.as_os_str(),
        "--flamegraph".as_ref(),
        svg.as_os_str(),
    ];
    // memtrace's report goes straight to our stdout.
    let mut tracer = Tracer::attach(&bin, service.pid(), &trace_args, Stdio::inherit())?;

    let load = Load { threads: args.threads, connections: args.connections, duration_s: args.duration };
    step(&format!(
        "drive it with wrk -t{} -c{} -d{}s (one request in 120 places an order and leaks 1 MiB)",
        load.threads, load.connections, load.duration_s
    ));
    let result = service::wrk(&service.url(), &load)?;
    eprint!("{}", result.output);
    if let Some(stats) = service.stats() {
        note(&format!("the service says: {stats}"));
    }

    step("memtrace's report");
    let status = tracer.proc.wait(Duration::from_secs(u64::from(trace_s) + 180))?;
    service.stop();
    if !status.success() {
        bail!("memtrace attach exited with {status}");
    }

    step("demo: done");
    for (what, path) in [("JSON report", &json), ("flame graph", &svg)] {
        if path.is_file() {
            note(&format!("{what}: {}", path.display()));
        } else {
            note(&format!("{what}: missing ({} was not written)", path.display()));
        }
    }
    Ok(())
}
