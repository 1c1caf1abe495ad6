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

    // The service keeps at most 1,200 MiB (its leak cap). A fast machine places orders
    // fast enough to reach the cap half-way through the load, after which the leak is
    // flat and rightly judged no leak: a short calibration run sets the order rate so that
    // the leak grows for the whole run. It places no order: nothing leaks before tracing.
    let calibration = Load {
        threads: args.threads,
        connections: args.connections,
        duration_s: 3,
        order_every: Some(u32::MAX),
    };
    let rps = service::wrk(&service.url(), &calibration)?.requests_per_s;
    let order_every = order_every_for(rps, args.duration);
    note(&format!("calibration: {rps:.0} requests/s, so one request in {order_every} places an order"));

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

    let load = Load {
        threads: args.threads,
        connections: args.connections,
        duration_s: args.duration,
        order_every: Some(order_every),
    };
    step(&format!(
        "drive it with wrk -t{} -c{} -d{}s (one request in {order_every} places an order and leaks 1 MiB)",
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

/// `load.lua`'s own default.
const DEFAULT_ORDER_EVERY: u32 = 120;
/// The example service's default leak cap (`LEAK_CAP_MB`), in MiB.
const LEAK_CAP_MIB: f64 = 1200.0;

/// One request in how many should place an order (and leak 1 MiB) so that `rps`
/// requests a second for `seconds` fill at most 60% of the leak cap: the default rate,
/// or a slower one on a machine fast enough to reach the cap within the run.
fn order_every_for(rps: f64, seconds: u32) -> u32 {
    let requests = rps.max(0.0) * f64::from(seconds);
    let needed = (requests / (LEAK_CAP_MIB * 0.6)).ceil();
    if needed.is_finite() && needed > f64::from(DEFAULT_ORDER_EVERY) {
        needed.min(f64::from(u32::MAX)) as u32
    } else {
        DEFAULT_ORDER_EVERY
    }
}

#[cfg(test)]
mod tests {
    use super::order_every_for;

    #[test]
    fn the_leak_never_reaches_the_cap_within_the_run() {
        // A slow machine keeps the script's rate; a fast one (11,870 requests/s measured
        // here, which reached the cap in 12 s of 20) gets a slower one.
        assert_eq!(order_every_for(2_000.0, 20), 120);
        let every = order_every_for(11_870.0, 20);
        let leaked_mib = 11_870.0 * 20.0 / f64::from(every);
        assert!(leaked_mib <= 720.0 && leaked_mib > 600.0, "{every}: {leaked_mib} MiB");
        assert_eq!(order_every_for(0.0, 20), 120);
        assert_eq!(order_every_for(f64::NAN, 20), 120);
    }
}
