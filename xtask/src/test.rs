//! `cargo xtask test`: build, unit tests, a short fuzz run of each parser, integration tests.

use anyhow::{Context as _, Result, bail};

use crate::proc::{self, step};

#[derive(clap::Args)]
#[allow(clippy::struct_excessive_bools, reason = "each is one command-line flag")]
pub struct Args {
    /// Run only the unit tests (no root needed).
    #[arg(long, conflicts_with = "integration_only")]
    unit_only: bool,
    /// Run only the integration tests.
    #[arg(long)]
    integration_only: bool,
    /// Skip the short fuzz run (each target of tracer/fuzz for `--fuzz-seconds`).
    #[arg(long, conflicts_with = "fuzz_only")]
    no_fuzz: bool,
    /// Run only the short fuzz run.
    #[arg(long, conflicts_with_all = ["unit_only", "integration_only"])]
    fuzz_only: bool,
    /// Seconds each fuzz target runs.
    #[arg(long, default_value_t = 5)]
    fuzz_seconds: u32,
    /// Passed to the integration test harness, e.g. a test name or `--nocapture`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "HARNESS_ARGS")]
    passthrough: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    if args.fuzz_only {
        return crate::fuzz::run(args.fuzz_seconds);
    }
    // The default members: everything but tracer-ebpf, which cannot build for the host;
    // tracer's build.rs compiles it for bpfel-unknown-none.
    step("test: build the workspace (tracer's build.rs builds the eBPF object)");
    proc::run(proc::cargo().arg("build")).context("build the workspace")?;

    // Both suites run even when the first fails, so that one run reports everything.
    let mut failed = Vec::new();
    if !args.integration_only {
        step("test: unit tests");
        let unit = proc::run(proc::cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "integration-tests",
            "--exclude",
            "tracer-ebpf",
            "--no-fail-fast",
        ]));
        if let Err(err) = unit {
            eprintln!("xtask: {err:#}");
            failed.push("unit tests");
        }
        if !args.no_fuzz
            && let Err(err) = crate::fuzz::run(args.fuzz_seconds)
        {
            eprintln!("xtask: {err:#}");
            failed.push("fuzzing");
        }
    }

    if !args.unit_only {
        step("test: integration tests (load real BPF programs; need root)");
        if !proc::is_root() {
            proc::note("not root: each integration test will report SKIPPED");
        }
        let memtrace = proc::target_dir().join("debug").join("memtrace");
        let mut cmd = proc::cargo();
        cmd.args(["test", "-p", "integration-tests", "--no-fail-fast", "--", "--test-threads=1"])
            .args(&args.passthrough);
        if std::env::var_os("MEMTRACE_BIN").is_none() {
            cmd.env("MEMTRACE_BIN", &memtrace);
        }
        if let Err(err) = proc::run(&mut cmd) {
            eprintln!("xtask: {err:#}");
            failed.push("integration tests");
        }
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    step("test: all passed");
    Ok(())
}
