//! `cargo xtask setup`: install what a fresh machine lacks. Every step checks first, so a
//! second run does nothing.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::proc::{self, note, step};

/// Debian packages: LLVM 22 for bpf-linker, wrk for the demo and the benchmark,
/// chromium for the integration test that opens memtrace's SVG flame graph, valgrind
/// for the test that compares the allocator view with memcheck, tmux, the terminal the
/// live view's test draws in, and openssl, the TLS server of the Pyroscope push test.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "wrk",
    "chromium",
    "valgrind",
    "tmux",
    "openssl",
];
/// The bpf-linker release built against Debian's LLVM 22 (pinned: CI must not pick up a
/// release that needs a newer Rust).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn run() -> Result<()> {
    apt_packages()?;
    nightly()?;
    bpf_linker()?;
    tracefs()?;
    example_deps()?;
    step("setup: done");
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if proc::is_root() { Ok(()) } else { bail!("{what} needs root: run `sudo -E cargo xtask setup`") }
}

fn dpkg_installed(package: &str) -> bool {
    proc::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.trim() == "install ok installed")
}

fn apt_packages() -> Result<()> {
    step("setup: Debian packages");
    let mut missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    // The fixtures are compiled with gcc; the example and a fixture run on node.
    if !proc::succeeds(Command::new("gcc").arg("--version")) {
        missing.push("gcc");
    }
    if !proc::succeeds(Command::new("g++").arg("--version")) {
        missing.push("g++");
    }
    if !proc::succeeds(Command::new("node").arg("--version")) {
        missing.extend(["nodejs", "npm"]);
    } else if !proc::succeeds(Command::new("npm").arg("--version")) {
        missing.push("npm");
    }
    if missing.is_empty() {
        note("all present");
        return Ok(());
    }
    note(&format!("missing: {}", missing.join(" ")));
    require_root("installing Debian packages")?;
    // Without a fresh package list apt does not find llvm-22-dev on a new machine.
    proc::run(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update")?;
    proc::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("apt-get install {}", missing.join(" ")))
}

fn nightly() -> Result<()> {
    step("setup: nightly toolchain with rust-src (builds the eBPF programs)");
    let toolchains = proc::output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if toolchains.lines().any(|line| line.starts_with("nightly")) {
        note("nightly present");
    } else {
        proc::run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("install the nightly toolchain")?;
    }
    let installed = proc::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|line| line.trim().starts_with("rust-src")) {
        note("rust-src present");
        return Ok(());
    }
    proc::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("add rust-src to the nightly toolchain")
}

fn bpf_linker() -> Result<()> {
    step("setup: bpf-linker (built against LLVM 22)");
    if let Some(version) = proc::output(Command::new("bpf-linker").arg("--version")) {
        note(&format!("present: {}", version.trim()));
        return Ok(());
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!(
            "{LLVM_PREFIX}/bin/llvm-config is missing: install llvm-22-dev (cargo xtask setup does, as root)"
        );
    }
    note("not found; building it (about a minute)");
    proc::run(
        proc::cargo()
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
    .context("cargo install bpf-linker (without LLVM_PREFIX it fails with `unable to find -lLLVM`)")?;
    if !proc::succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

fn tracefs() -> Result<()> {
    step("setup: tracefs (tracepoints attach through it)");
    if Path::new(TRACEFS).join("events").is_dir() {
        note(&format!("mounted at {TRACEFS}"));
        return Ok(());
    }
    require_root("mounting tracefs")?;
    proc::run(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS]))
        .with_context(|| format!("mount tracefs at {TRACEFS}"))?;
    if !Path::new(TRACEFS).join("events").is_dir() {
        bail!("mounted tracefs at {TRACEFS} but {TRACEFS}/events is still missing");
    }
    Ok(())
}

fn example_deps() -> Result<()> {
    let dir = crate::service::example_dir();
    step(&format!("setup: npm dependencies of {}", dir.display()));
    if dir.join("node_modules").is_dir() {
        note("node_modules present");
        return Ok(());
    }
    let verb = if dir.join("package-lock.json").is_file() { "ci" } else { "install" };
    proc::run(Command::new("npm").args([verb, "--no-audit", "--no-fund"]).current_dir(&dir))
        .with_context(|| format!("npm {verb} in {}", dir.display()))
}
