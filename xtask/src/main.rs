//! memtrace's development tasks: `cargo xtask setup | test | demo | bench overhead | bench soak`.

mod bench;
mod bench_malloc;
mod demo;
mod fuzz;
mod proc;
mod service;
mod setup;
mod soak;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about = "memtrace's development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what a fresh machine lacks (idempotent; run as root).
    Setup,
    /// Build, run the unit tests, fuzz each parser briefly, then the integration tests
    /// (those need root).
    Test(test::Args),
    /// Trace the bundled leaky Express service under load and print memtrace's report.
    Demo(demo::Args),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Subcommand)]
enum Bench {
    /// Throughput of the example service with and without memtrace attached.
    Overhead(bench::Args),
    /// ns per malloc+free pair, untraced and under each `--track malloc` mode.
    Malloc(bench_malloc::Args),
    /// memtrace attached to the example service under wrk for a long run: its CPU and RSS
    /// sampled over time.
    Soak(soak::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Test(args) => test::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(Bench::Overhead(args)) => bench::run(&args),
        Command::Bench(Bench::Malloc(args)) => bench_malloc::run(&args),
        Command::Bench(Bench::Soak(args)) => soak::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
