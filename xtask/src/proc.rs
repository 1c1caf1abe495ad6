//! Running commands and child processes: steps, workspace paths, line readers.

use std::{
    env,
    ffi::OsString,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Prints a step header, as every task does before it acts.
pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

pub fn note(msg: &str) {
    eprintln!("    {msg}");
}

pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cargo target directory: `$CARGO_TARGET_DIR` (relative to the workspace) or `target`.
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

/// The cargo that runs us (`$CARGO`), so that nested builds use the same toolchain.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let text = describe(cmd);
    note(&format!("$ {text}"));
    let status = cmd.status().with_context(|| format!("could not start `{text}`"))?;
    if !status.success() {
        bail!("`{text}` failed ({status})");
    }
    Ok(())
}

/// Whether `cmd` runs and exits 0, quietly.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The stdout of `cmd`, if it runs and exits 0.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads a child's stream line by line on a thread, optionally echoing each line to
/// stderr with a prefix, and hands the lines over a channel.
pub struct Lines {
    rx: Receiver<String>,
}

impl Lines {
    pub fn spawn(stream: impl Read + Send + 'static, echo: Option<&str>) -> Self {
        let (tx, rx) = mpsc::channel();
        let echo = echo.map(str::to_owned);
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(prefix) = &echo {
                    eprintln!("{prefix}{line}");
                }
                // Nobody may be listening any more; the line was echoed.
                let _ = tx.send(line);
            }
        });
        Self { rx }
    }

    /// Waits for a line containing `needle` (case-insensitive).
    pub fn wait_for(&self, needle: &str, timeout: Duration, what: &str) -> Result<String> {
        let needle = needle.to_lowercase();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if line.to_lowercase().contains(&needle) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{what} did not print {needle:?} within {timeout:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("{what} closed its output before printing {needle:?}")
                }
            }
        }
    }
}

/// A child we started: killed (by its own pid, never by name) on drop unless reaped.
pub struct Owned {
    pub name: String,
    child: Option<Child>,
}

impl Owned {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let text = describe(cmd);
        note(&format!("$ {text} &"));
        let child = cmd.spawn().with_context(|| format!("could not start {name}: `{text}`"))?;
        Ok(Self { name: name.to_owned(), child: Some(child) })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn child_mut(&mut self) -> Result<&mut Child> {
        self.child.as_mut().with_context(|| format!("{} was already reaped", self.name))
    }

    /// Sends `signal` to this child if it has not been reaped.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        let child = self.child_mut()?;
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child, so it
        // cannot have been reused by another process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {} (pid {pid})", self.name));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the child to exit and returns its status and peak RSS
    /// in bytes (`ru_maxrss` from wait4). Kills it when the time is up.
    pub fn wait_with_rusage(&mut self, timeout: Duration) -> Result<(ExitStatus, u64)> {
        use std::os::unix::process::ExitStatusExt as _;

        let child = self.child.take().with_context(|| format!("{} was already reaped", self.name))?;
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        let deadline = Instant::now() + timeout;
        let mut killed = false;
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: rusage is plain old data, fully written by wait4 on success.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: the pointers are valid for the call; pid is our own unreaped child.
            let rc = unsafe { libc::wait4(pid, &raw mut status, libc::WNOHANG, &raw mut usage) };
            if rc == pid {
                let max_rss = u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024;
                return Ok((ExitStatus::from_raw(status), max_rss));
            }
            if rc < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("wait for {}", self.name));
            }
            if Instant::now() >= deadline && !killed {
                eprintln!("xtask: {} still running after {timeout:?}; killing pid {pid}", self.name);
                // SAFETY: as in `signal`: our own unreaped child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed = true;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills (SIGKILL, by pid) and reaps the child, if it has not been reaped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill signals this child's pid only.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        Ok(self.wait_with_rusage(timeout)?.0)
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.kill();
    }
}
