//! Is the target a Node.js process, and how will its inspector open?

use std::{fs, path::Path};

use object::{Object as _, ObjectSymbol as _, read::ReadCache};

use super::JsHeapError;
use crate::procfs::maps::parse_maps;

/// The port SIGUSR1 opens when the command line names none.
pub const DEFAULT_INSPECT_PORT: u16 = 9229;

/// `node::Start(int, char**)`: every Node.js since v8 defines it; V8 embedders that are
/// not Node (Deno, Electron's renderers) do not open an inspector on SIGUSR1.
const NODE_START_SYMBOL: &str = "_ZN4node5StartEiPPc";

/// What the JS heap view needs to know about a Node target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTarget {
    pub pid: u32,
    /// The ELF file that holds Node (the executable, or a mapped libnode).
    pub node_module: String,
    pub options: NodeOptions,
    /// SIGUSR1 has a handler: without one the signal would kill the process.
    pub catches_sigusr1: bool,
    pub uid: u32,
    pub gid: u32,
}

/// The inspector-related options of the command line and `NODE_OPTIONS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeOptions {
    pub disable_sigusr1: bool,
    /// `--inspect`, `--inspect-brk` or `--inspect-wait`: the inspector opened at start.
    pub inspect_at_start: bool,
    /// The port SIGUSR1 opens (`--inspect-port`, `--inspect=[host:]port`), 0 for a
    /// random one.
    pub inspect_port: u16,
}

/// Whether `pid` runs Node.js, and how its inspector will open. `Err(NotNode)` for any
/// other process.
pub fn detect(pid: u32) -> Result<NodeTarget, JsHeapError> {
    let maps =
        fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| JsHeapError::proc(pid, "maps", &e))?;
    let exe = fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| JsHeapError::proc(pid, "exe", &e))?;
    let exe = exe.to_string_lossy().into_owned();
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe).to_string();
    let mut candidates = vec![exe];
    for entry in parse_maps(&maps) {
        let path = entry.path_on_disk();
        let is_libnode =
            Path::new(path).file_name().is_some_and(|n| n.to_string_lossy().starts_with("libnode.so"));
        if is_libnode && !candidates.iter().any(|c| c == path) {
            candidates.push(path.to_string());
        }
    }
    // Through /proc/PID/root: the file as the target sees it (a container's image).
    let node_module = candidates
        .into_iter()
        .find(|path| defines_node_start(&format!("/proc/{pid}/root{path}")))
        .ok_or(JsHeapError::NotNode { pid })?;
    let cmdline =
        fs::read(format!("/proc/{pid}/cmdline")).map_err(|e| JsHeapError::proc(pid, "cmdline", &e))?;
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let options = parse_node_options(&split_nul(&cmdline), &split_nul(&environ));
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| JsHeapError::proc(pid, "status", &e))?;
    let catches_sigusr1 = signal_caught(&status, libc::SIGUSR1);
    let ids = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|effective| effective.parse().ok())
            .unwrap_or(0)
    };
    Ok(NodeTarget { pid, node_module, options, catches_sigusr1, uid: ids("Uid:"), gid: ids("Gid:") })
}

/// Reads only the ELF headers and symbol tables (node is ~100 MB).
fn defines_node_start(path: &str) -> bool {
    let Ok(file) = fs::File::open(path) else { return false };
    let cache = ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else { return false };
    elf.dynamic_symbols()
        .chain(elf.symbols())
        .any(|s| s.is_definition() && s.name_bytes().is_ok_and(|n| n == NODE_START_SYMBOL.as_bytes()))
}

fn split_nul(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Options of node's that take their value as the next word (the ones that matter here,
/// and common ones whose value would otherwise read as the script).
const TAKES_VALUE: [&str; 8] =
    ["--inspect-port", "--debug-port", "-r", "--require", "--import", "--loader", "--title", "--env-file"];

/// Node's own options come before the script (or `-e`); `NODE_OPTIONS` holds more.
fn parse_node_options(argv: &[String], environ: &[String]) -> NodeOptions {
    let mut options = NodeOptions { inspect_port: DEFAULT_INSPECT_PORT, ..NodeOptions::default() };
    let from_env = environ
        .iter()
        .find_map(|kv| kv.strip_prefix("NODE_OPTIONS="))
        .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_default();
    // Node's own options end at the first word that is neither an option nor the value
    // of one (the script), or at `--`, `-e`, `-p`.
    let mut own = Vec::new();
    let mut words_of_node = argv.iter().skip(1);
    while let Some(arg) = words_of_node.next() {
        if !arg.starts_with('-') || arg == "--" || arg == "-e" || arg == "-p" {
            break;
        }
        own.push(arg.clone());
        if TAKES_VALUE.contains(&arg.as_str())
            && let Some(value) = words_of_node.next()
        {
            own.push(value.clone());
        }
    }
    let words: Vec<&String> = from_env.iter().chain(&own).collect();
    let mut i = 0;
    while i < words.len() {
        let (flag, value) = match words[i].split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (words[i].as_str(), None),
        };
        match flag {
            "--disable-sigusr1" => options.disable_sigusr1 = true,
            "--inspect" | "--inspect-brk" | "--inspect-wait" => {
                options.inspect_at_start = true;
                if let Some(port) = value.as_deref().and_then(port_of) {
                    options.inspect_port = port;
                }
            }
            "--inspect-port" | "--debug-port" => {
                let value = value.or_else(|| {
                    i += 1;
                    words.get(i).map(|w| (*w).clone())
                });
                if let Some(port) = value.as_deref().and_then(port_of) {
                    options.inspect_port = port;
                }
            }
            _ => {}
        }
        i += 1;
    }
    options
}

/// `9230`, `127.0.0.1:9230`, `[::1]:9230` → 9230; a bare host keeps the default.
fn port_of(value: &str) -> Option<u16> {
    value.rsplit_once(':').map_or(value, |(_, port)| port).parse().ok()
}

/// Whether `SigCgt` of a `/proc/PID/status` text has `signal`.
fn signal_caught(status: &str, signal: i32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn node_options_come_from_the_command_line_and_node_options() {
        let o = parse_node_options(&words("node app.js --inspect"), &[]);
        assert_eq!(
            o,
            NodeOptions { inspect_port: 9229, ..NodeOptions::default() },
            "after the script: the app's"
        );
        let o = parse_node_options(&words("node --inspect=127.0.0.1:9333 app.js"), &[]);
        assert!(o.inspect_at_start);
        assert_eq!(o.inspect_port, 9333);
        let o = parse_node_options(&words("node --inspect-port 0 app.js"), &[]);
        assert!(!o.inspect_at_start);
        assert_eq!(o.inspect_port, 0);
        let o = parse_node_options(
            &words("/usr/bin/node app.js"),
            &words("PATH=/bin NODE_OPTIONS=--disable-sigusr1"),
        );
        assert!(o.disable_sigusr1);
        let o = parse_node_options(&words("node --disable-sigusr1 -e 1"), &[]);
        assert!(o.disable_sigusr1);
    }

    #[test]
    fn sigusr1_is_bit_9_of_sigcgt() {
        assert!(signal_caught("SigIgn:\t0000000001001000\nSigCgt:\t0000000180014202\n", libc::SIGUSR1));
        assert!(!signal_caught("SigCgt:\t0000000180014002\n", libc::SIGUSR1));
    }

    #[test]
    fn this_test_binary_is_not_node() {
        let pid = std::process::id();
        assert!(matches!(detect(pid), Err(JsHeapError::NotNode { pid: p }) if p == pid));
    }
}
