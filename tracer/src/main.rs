use clap::Parser as _;

fn main() -> std::process::ExitCode {
    // Output piped into `head` ends quietly, as other command-line tools do.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = memtrace::cli::Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new().filter_level(level).parse_default_env().init();
    match memtrace::app::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("memtrace: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
