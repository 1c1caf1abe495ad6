//! `cargo xtask setup`: install what a fresh machine lacks. Every step checks first, so a
//! second run does nothing.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::proc::{self, note, step};

/// Debian packages: LLVM 22 for bpf-linker, wrk for the demo and the benchmark,
/// chromium for the integration test that opens memtrace's SVG flame graph, valgrind
/// for the test that compares the allocator view with memcheck, tmux, the terminal the
/// live view's test draws in, openssl, the TLS server of the Pyroscope push test, and
/// prometheus (with promtool), which scrapes memtrace and checks the example alert rules.
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
    "prometheus",
];
/// The bpf-linker release built against Debian's LLVM 22 (pinned: CI must not pick up a
/// release that needs a newer Rust).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn run() -> Result<()> {
    apt_packages()?;
    nightly()?;
    cargo_fuzz()?;
    bpf_linker()?;
    tracefs()?;
    example_deps()?;
    node18()?;
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

/// The cargo-fuzz release `cargo xtask test` fuzzes with (pinned, like bpf-linker).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// `cargo +nightly`, through rustup's proxy (`$CARGO` is the stable toolchain's cargo).
pub fn cargo_nightly() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").env_remove("CARGO").env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn cargo_fuzz() -> Result<()> {
    step("setup: cargo-fuzz (fuzzes the parsers, with nightly)");
    if let Some(version) = proc::output(cargo_nightly().args(["fuzz", "--version"])) {
        note(&format!("present: {}", version.trim()));
        return Ok(());
    }
    proc::run(proc::cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))
        .context("cargo install cargo-fuzz")?;
    if !proc::succeeds(cargo_nightly().args(["fuzz", "--version"])) {
        bail!("cargo-fuzz was installed but `cargo +nightly fuzz` does not run: add ~/.cargo/bin to PATH");
    }
    Ok(())
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

/// Debian's node 18 (V8 10.2, V8 in libnode.so, no `.symtab`), extracted beside the
/// system's node for the test that names JS frames from the heap of a second major
/// version. Installing it would replace the system's node, so its packages are unpacked
/// into the target directory, and a wrapper runs it in a mount namespace where its
/// externalized JS dependencies are at the /usr/share/nodejs it was built for.
const NODE18_PACKAGES: &[&str] =
    &["libuv1", "libc-ares2", "node-cjs-module-lexer", "node-acorn", "node-undici"];

fn node18() -> Result<()> {
    let dir = proc::target_dir().join("fixtures/node18");
    step(&format!("setup: Debian's node 18 in {}", dir.display()));
    let wrapper = dir.join("node");
    if wrapper.is_file() && dir.join("root/usr/bin/node").is_file() {
        note("present");
        return Ok(());
    }
    require_root("unpacking node 18 (apt-get download)")?;
    // The newest 18.x Debian offers, not the system's nodejs (another major version).
    let madison = proc::output(Command::new("apt-cache").args(["madison", "nodejs"])).unwrap_or_default();
    let version = madison
        .lines()
        .filter_map(|line| line.split('|').nth(1).map(str::trim))
        .find(|v| v.starts_with("18."))
        .context("apt-cache madison nodejs lists no 18.x version (run apt-get update)")?
        .to_string();
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("create {}", debs.display()))?;
    let mut packages = vec![format!("nodejs={version}"), format!("libnode108={version}")];
    packages.extend(NODE18_PACKAGES.iter().map(ToString::to_string));
    proc::run(Command::new("apt-get").arg("download").args(&packages).current_dir(&debs))
        .with_context(|| format!("apt-get download {}", packages.join(" ")))?;
    let root = dir.join("root");
    for entry in std::fs::read_dir(&debs).with_context(|| format!("list {}", debs.display()))? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            proc::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))
                .with_context(|| format!("dpkg -x {}", deb.display()))?;
        }
    }
    let root = root.display();
    // /usr/share is replaced (in the namespace only) by an empty tmpfs holding the
    // packages' nodejs directory: nothing is created outside the target directory.
    let script = format!(
        "#!/bin/sh\n\
         # Debian's node 18 from {root}, made by `cargo xtask setup`.\n\
         exec unshare -m sh -c 'mount -t tmpfs tmpfs /usr/share && mkdir /usr/share/nodejs && \\\n\
         mount --bind {root}/usr/share/nodejs /usr/share/nodejs && \\\n\
         LD_LIBRARY_PATH={root}/usr/lib/x86_64-linux-gnu exec {root}/usr/bin/node \"$@\"' node18 \"$@\"\n"
    );
    std::fs::write(&wrapper, script).with_context(|| format!("write {}", wrapper.display()))?;
    proc::run(Command::new("chmod").arg("+x").arg(&wrapper))?;
    let check = proc::output(Command::new(&wrapper).args(["-p", "process.versions.v8"])).unwrap_or_default();
    if !check.starts_with("10.") {
        bail!("{} does not run node 18 (printed {check:?})", wrapper.display());
    }
    note(&format!("node 18 with V8 {}", check.trim()));
    Ok(())
}
