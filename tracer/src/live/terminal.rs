//! The terminal side of the live view: raw mode and the alternate screen, restored on
//! every way out (return, error, panic); stderr captured meanwhile, so that a warning
//! printed by any part of the trace does not tear the screen; keys read on a thread.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, IsTerminal as _, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc, Once,
        atomic::{AtomicBool, AtomicI32, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crossterm::{
    cursor, event,
    terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
};
use ratatui::{Terminal, backend::CrosstermBackend};

/// The real stderr while the screen is up (-1 otherwise), for the panic hook.
static SCREEN_FD: AtomicI32 = AtomicI32::new(-1);
static PANIC_HOOK: Once = Once::new();

/// Why there is no live view.
#[must_use]
pub fn no_terminal_reason() -> Option<&'static str> {
    if !io::stdin().is_terminal() {
        Some("stdin is not a terminal")
    } else if !io::stderr().is_terminal() {
        Some("stderr is not a terminal")
    } else {
        None
    }
}

pub type Backend = CrosstermBackend<File>;

/// The full-screen terminal; dropping it restores the terminal.
pub struct Screen {
    terminal: Terminal<Backend>,
    capture: Option<StderrCapture>,
    active: bool,
}

impl Screen {
    /// Captures stderr, then switches the terminal (the original stderr) to raw mode and
    /// the alternate screen.
    pub fn enter() -> io::Result<Self> {
        install_panic_hook();
        let capture = StderrCapture::start()?;
        let out = File::from(capture.original.try_clone()?);
        let screen_fd = out.as_raw_fd();
        let mut screen = Self {
            terminal: Terminal::new(CrosstermBackend::new(out))?,
            capture: Some(capture),
            active: true,
        };
        SCREEN_FD.store(screen_fd, Ordering::SeqCst);
        terminal::enable_raw_mode()?;
        crossterm::execute!(screen.terminal.backend_mut(), EnterAlternateScreen, cursor::Hide)?;
        screen.terminal.clear()?;
        Ok(screen)
    }

    pub fn terminal(&mut self) -> &mut Terminal<Backend> {
        &mut self.terminal
    }

    /// Lines written to stderr since the last call.
    pub fn captured(&self) -> Vec<String> {
        self.capture.as_ref().map(|c| c.lines.try_iter().collect()).unwrap_or_default()
    }

    /// Puts the terminal back and stderr where it was; returns what stderr received and
    /// was not yet taken. Safe to call twice.
    pub fn restore(&mut self) -> Vec<String> {
        if self.active {
            self.active = false;
            SCREEN_FD.store(-1, Ordering::SeqCst);
            let _ = terminal::disable_raw_mode();
            let _ = crossterm::execute!(self.terminal.backend_mut(), LeaveAlternateScreen, cursor::Show);
            let _ = self.terminal.backend_mut().flush();
        }
        self.capture.take().map(StderrCapture::stop).unwrap_or_default()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        for line in self.restore() {
            eprintln!("{line}");
        }
    }
}

/// On a panic the terminal comes back first, so that the message is readable.
fn install_panic_hook() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let fd = SCREEN_FD.swap(-1, Ordering::SeqCst);
            if fd >= 0 {
                let _ = terminal::disable_raw_mode();
                let leave = b"\x1b[?1049l\x1b[?25h";
                // SAFETY: `fd` is the original stderr, kept open by the live `Screen`
                // (it is set to -1 before that closes it); writing and dup2 onto fd 2
                // only affect this process's descriptors.
                unsafe {
                    libc::write(fd, leave.as_ptr().cast(), leave.len());
                    libc::dup2(fd, libc::STDERR_FILENO);
                }
            }
            previous(info);
        }));
    });
}

/// Stderr redirected into a pipe read on a thread, line by line.
struct StderrCapture {
    /// The original stderr (the terminal).
    original: OwnedFd,
    lines: mpsc::Receiver<String>,
    thread: Option<JoinHandle<()>>,
}

impl StderrCapture {
    fn start() -> io::Result<Self> {
        let _ = io::stderr().flush();
        // SAFETY: F_DUPFD_CLOEXEC on fd 2 returns a new descriptor or -1.
        let original = unsafe { libc::fcntl(libc::STDERR_FILENO, libc::F_DUPFD_CLOEXEC, 3) };
        if original < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, owned only here.
        let original = unsafe { OwnedFd::from_raw_fd(original) };
        let mut fds: [RawFd; 2] = [-1; 2];
        // SAFETY: valid pointer to two ints; O_CLOEXEC keeps both ends out of children.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us these descriptors; each is owned once.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: dup2 onto fd 2; the write end is closed below, fd 2 keeps the pipe.
        if unsafe { libc::dup2(write_end.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(write_end);
        let (tx, lines) = mpsc::channel();
        let thread = std::thread::Builder::new().name("memtrace-stderr".into()).spawn(move || {
            for line in BufReader::new(File::from(read_end)).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })?;
        Ok(Self { original, lines, thread: Some(thread) })
    }

    /// Puts the original stderr back and returns the lines not yet taken.
    fn stop(mut self) -> Vec<String> {
        // SAFETY: dup2 of a descriptor we own onto fd 2; this closes the pipe's last
        // write end, so the reader thread sees the end of its input.
        unsafe { libc::dup2(self.original.as_raw_fd(), libc::STDERR_FILENO) };
        let mut out = Vec::new();
        // Bounded: a child holding the pipe's write end must not hang the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            out.push(line);
        }
        if let Some(thread) = self.thread.take()
            && thread.is_finished()
        {
            let _ = thread.join();
        }
        out
    }
}

/// Terminal events read on a thread (crossterm's reader blocks), ended by `stop`.
pub struct Keys {
    pub events: tokio::sync::mpsc::UnboundedReceiver<event::Event>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Keys {
    pub fn spawn() -> io::Result<Self> {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("memtrace-keys".into()).spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match event::poll(Duration::from_millis(100)) {
                    Ok(false) => {}
                    Ok(true) => {
                        let Ok(ev) = event::read() else { break };
                        if tx.send(ev).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        })?;
        Ok(Self { events, stop, thread: Some(thread) })
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
