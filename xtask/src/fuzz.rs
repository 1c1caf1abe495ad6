//! The short fuzz run of `cargo xtask test`: every target of `tracer/fuzz` for a few
//! seconds, starting from the corpus kept in the repository.
//!
//! New inputs the fuzzer finds go to a scratch directory under the target directory, so
//! a run leaves the repository's corpus as it was; a crash is written by libFuzzer to
//! `tracer/fuzz/artifacts/<target>/` and fails the run with that path.

use std::{fs, path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{
    proc::{self, note, step},
    setup,
};

fn tracer_dir() -> PathBuf {
    proc::workspace_root().join("tracer")
}

/// `cargo +nightly fuzz SUBCOMMAND` in `tracer/`, without the eBPF object (no target loads
/// it). Built unoptimized with debug assertions and no sanitizer: the run is seconds long,
/// overflow checks are what find most parser bugs (all four found so far were overflows),
/// and an optimized, sanitized build of the tracer's dependencies takes a quarter of an
/// hour of CPU, which CI cannot spend on every run.
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut cmd = setup::cargo_nightly();
    cmd.args(["fuzz", subcommand]);
    if subcommand != "list" {
        cmd.args(["--dev", "--sanitizer", "none"]);
    }
    cmd.current_dir(tracer_dir()).env("AYA_BUILD_SKIP", "1");
    cmd
}

/// Builds the fuzz targets, then runs each for `seconds`, and says how long it all took.
pub fn run(seconds: u32) -> Result<()> {
    let started = Instant::now();
    step("test: build the fuzz targets (cargo +nightly fuzz build --dev --sanitizer none)");
    proc::run(&mut cargo_fuzz("build")).context("cargo +nightly fuzz build (run `cargo xtask setup`)")?;
    let built = started.elapsed().as_secs_f64();
    let list = proc::output(&mut cargo_fuzz("list")).context("cargo +nightly fuzz list")?;
    let targets: Vec<&str> = list.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if targets.is_empty() {
        bail!("cargo fuzz list names no targets in {}/fuzz", tracer_dir().display());
    }
    step(&format!("test: fuzz {} targets for {seconds} s each", targets.len()));
    let scratch = proc::target_dir().join("fuzz-corpus");
    let mut crashed = Vec::new();
    let mut execs = Vec::new();
    for target in &targets {
        let new_inputs = scratch.join(target);
        fs::create_dir_all(&new_inputs).with_context(|| format!("create {}", new_inputs.display()))?;
        let seeds = tracer_dir().join("fuzz/corpus").join(target);
        let mut cmd = cargo_fuzz("run");
        cmd.arg(target).arg(&new_inputs).arg(&seeds).args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-max_len=65536",
            "-print_final_stats=1",
        ]);
        let out = cmd.output().with_context(|| format!("cargo fuzz run {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map_or_else(|| "?".to_owned(), |n| n.trim().to_owned());
        if out.status.success() {
            note(&format!("{target}: {runs} runs, no crash"));
            execs.push(format!("{target} {runs}"));
        } else {
            let artifact = log
                .lines()
                .find_map(|l| l.split("Test unit written to ").nth(1))
                .unwrap_or("(no artifact written)")
                .trim()
                .to_owned();
            eprintln!("{log}");
            eprintln!("xtask: fuzz target {target} failed ({}); the input: {artifact}", out.status);
            crashed.push(format!("{target} ({artifact})"));
        }
    }
    let total = started.elapsed().as_secs_f64();
    note(&format!("fuzzing took {total:.0} s ({built:.0} s of it building)"));
    if !crashed.is_empty() {
        bail!(
            "fuzzing found crashes: {}. Reproduce with `cd tracer && cargo +nightly fuzz run TARGET INPUT`",
            crashed.join(", ")
        );
    }
    Ok(())
}
