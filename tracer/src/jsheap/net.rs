//! The target's network namespace: its listening TCP sockets (from /proc), sockets made
//! inside it, and the lock that lets one inspector window open in it at a time.

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd as _, linux::fs::MetadataExt as _, unix::fs::OpenOptionsExt as _},
    path::PathBuf,
    time::Duration,
};

use super::JsHeapError;

/// A listening TCP socket of the target's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub inode: u64,
}

impl Listener {
    /// Where to connect to reach it from inside its namespace.
    #[must_use]
    pub fn connect_addr(&self) -> SocketAddr {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.addr.port())
    }
}

/// The network namespace `pid` lives in.
#[derive(Clone, Debug)]
pub struct NetNs {
    pid: u32,
    inode: u64,
    /// Not memtrace's own: sockets must be made on a thread that entered it.
    foreign: bool,
}

impl NetNs {
    pub fn of(pid: u32) -> Result<Self, JsHeapError> {
        let theirs =
            fs::metadata(format!("/proc/{pid}/ns/net")).map_err(|e| JsHeapError::proc(pid, "ns/net", &e))?;
        let ours = fs::metadata("/proc/self/ns/net")
            .map_err(|e| JsHeapError::proc(std::process::id(), "ns/net", &e))?;
        Ok(Self { pid, inode: theirs.st_ino(), foreign: theirs.st_ino() != ours.st_ino() })
    }

    #[must_use]
    pub fn is_foreign(&self) -> bool {
        self.foreign
    }

    /// Runs `make` (which makes sockets) inside the namespace: sockets belong to the
    /// namespace of the thread that made them, so a thread enters it for the call.
    pub fn run<T: Send>(&self, make: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        if !self.foreign {
            return make();
        }
        let ns = File::open(format!("/proc/{}/ns/net", self.pid))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: `ns` is an open namespace file; setns changes only this
                    // thread's namespace, and the thread ends after `make`.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    make()
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(io::Error::other("the thread that entered the network namespace panicked"))
                })
        })
    }

    /// Every listening TCP socket in the namespace (IPv4 and IPv6).
    pub fn listeners(&self) -> Result<Vec<Listener>, JsHeapError> {
        let mut all = Vec::new();
        for table in ["tcp", "tcp6"] {
            match fs::read_to_string(format!("/proc/{}/net/{table}", self.pid)) {
                Ok(text) => all.extend(parse_listeners(&text)),
                // A kernel without IPv6 has no tcp6.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(JsHeapError::proc(self.pid, &format!("net/{table}"), &e)),
            }
        }
        Ok(all)
    }

    /// One inspector window at a time per namespace: SIGUSR1 opens the same default port
    /// in every Node process there, and two memtraces must not close each other's window.
    pub async fn lock_inspector(&self, wait: Duration) -> Result<File, JsHeapError> {
        let dir = ["/run/lock", "/run", "/tmp"]
            .into_iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
            .unwrap_or_default();
        let path = dir.join(format!("memtrace-inspector-{}.lock", self.inode));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| JsHeapError::Lock { path: path.display().to_string(), reason: e.to_string() })?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(JsHeapError::Lock {
                        path: path.display().to_string(),
                        reason: format!("another memtrace held it for {wait:?}"),
                    });
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(JsHeapError::Lock {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
}

/// Socket inodes among the open files of `pid`.
pub fn socket_inodes(pid: u32) -> Result<HashSet<u64>, JsHeapError> {
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| JsHeapError::proc(pid, "fd", &e))?;
    Ok(dir
        .flatten()
        .filter_map(|entry| fs::read_link(entry.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect())
}

/// The process that holds socket `inode`, with its name (for a "port held by" message).
#[must_use]
pub fn socket_holder(inode: u64) -> Option<(u32, String)> {
    let procs = fs::read_dir("/proc").ok()?;
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find_map(|pid| socket_inodes(pid).ok()?.contains(&inode).then(|| (pid, crate::procfs::comm(pid))))
}

/// `LISTEN` rows of a /proc/net/tcp or tcp6 table.
fn parse_listeners(text: &str) -> Vec<Listener> {
    const LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&LISTEN) {
                return None;
            }
            let addr = parse_hex_addr(fields.get(1)?)?;
            let inode = fields.get(9)?.parse().ok()?;
            Some(Listener { addr, inode })
        })
        .collect()
}

/// `0100007F:2405` (IPv4) or 32 hex digits `:port` (IPv6), each 32-bit word in host order.
fn parse_hex_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<u32>> = (0..ip.len() / 8)
        .map(|i| ip.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()))
        .collect();
    let words = words?;
    let ip = match (ip.len(), words.as_slice()) {
        (8, [w]) => IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes())),
        (32, [a, b, c, d]) => {
            let mut bytes = [0u8; 16];
            for (chunk, w) in bytes.chunks_exact_mut(4).zip([a, b, c, d]) {
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_rows_of_tcp_and_tcp6() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:240D 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 95431 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:240D 0100007F:A2C4 01 00000000:00000000 00:00000000 00000000     0        0 95555 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(
            parse_listeners(tcp),
            [Listener { addr: "127.0.0.1:9229".parse().expect("address"), inode: 95431 }]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1\n\
   1: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1\n";
        let l = parse_listeners(tcp6);
        assert_eq!(l[0].addr, "[::1]:8080".parse().expect("address"));
        assert_eq!(l[1].connect_addr(), "[::1]:8081".parse().expect("address"));
    }

    #[test]
    fn a_listener_of_this_process_is_found_with_its_owner() {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = socket.local_addr().expect("local address").port();
        let pid = std::process::id();
        let ns = NetNs::of(pid).expect("our network namespace");
        let ours = socket_inodes(pid).expect("our sockets");
        let found = ns
            .listeners()
            .expect("our listeners")
            .into_iter()
            .find(|l| l.addr.port() == port)
            .expect("listener in /proc");
        assert!(ours.contains(&found.inode));
        assert_eq!(socket_holder(found.inode).map(|(p, _)| p), Some(pid));
    }
}
