//! Native (ELF/DWARF) symbolization with blazesym, by file offset in a file we hold open.

use std::path::Path;

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{CodeInfo, Input, Sym, Symbolized, Symbolizer};

use crate::report::{Frame, FrameKind};

/// blazesym's `Symbolizer`, made movable between threads.
pub(crate) struct NativeSymbolizer {
    inner: Symbolizer,
}

// SAFETY: `Symbolizer` is `!Send` only because it keeps `Rc`s (its file cache, resolvers,
// memory maps, debug directories). Every one of those `Rc`s is created by and reachable
// only from this `Symbolizer`: we never call the APIs that share an `Rc` with the caller
// (`register_elf_resolver`, dispatchers), and no borrowed `Symbolized<'_>` outlives a call
// of `symbolize` below (results are converted to owned `Frame`s first). Moving the
// `Symbolizer` therefore moves every clone of those `Rc`s together, so no reference count
// is ever touched from two threads. `NativeSymbolizer` is not `Sync`.
unsafe impl Send for NativeSymbolizer {}

impl std::fmt::Debug for NativeSymbolizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeSymbolizer").finish_non_exhaustive()
    }
}

impl NativeSymbolizer {
    pub fn new() -> Self {
        let inner = Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            // blazesym hands names it cannot place in a language to the C++ demangler,
            // which reads a C function `f` as the type `float`: see `demangle`.
            .enable_demangling(false)
            // Our `/proc/self/fd/N` paths name files we hold open: they cannot change.
            .enable_auto_reload(false)
            .build();
        Self { inner }
    }

    /// Symbolizes file offsets of the ELF file at `path`. Per offset: its frames, innermost
    /// first, or `None` when blazesym found no symbol. `module` names the frames' module.
    ///
    /// DWARF is tried first; offsets it cannot name (or all of them, when the debug info
    /// cannot be read, e.g. compressed in a format we were built without) are retried with
    /// the ELF symbol tables alone.
    pub fn symbolize(&self, path: &Path, module: &str, file_offsets: &[u64]) -> Vec<Option<Vec<Frame>>> {
        let mut results = match self.symbolize_with(path, true, module, file_offsets) {
            Ok(results) => results,
            Err(err) => {
                log::debug!("DWARF symbolization in {module} failed ({err}); using ELF symbols");
                vec![None; file_offsets.len()]
            }
        };
        let retry: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_none()).collect();
        if retry.is_empty() {
            return results;
        }
        let offsets: Vec<u64> = retry.iter().map(|&i| file_offsets[i]).collect();
        match self.symbolize_with(path, false, module, &offsets) {
            Ok(again) => {
                for (i, frames) in retry.into_iter().zip(again) {
                    results[i] = frames;
                }
            }
            Err(err) => log::debug!("symbolization in {module} failed: {err}"),
        }
        results
    }

    pub(crate) fn symbolize_with(
        &self,
        path: &Path,
        debug_syms: bool,
        module: &str,
        file_offsets: &[u64],
    ) -> Result<Vec<Option<Vec<Frame>>>, blazesym::Error> {
        let mut elf = Elf::new(path);
        elf.debug_syms = debug_syms;
        let results = self.inner.symbolize(&Source::Elf(elf), Input::FileOffset(file_offsets))?;
        Ok(results
            .iter()
            .map(|result| match result {
                Symbolized::Sym(sym) => Some(sym_frames(sym, module)),
                Symbolized::Unknown(reason) => {
                    log::trace!("no symbol in {module}: {reason}");
                    None
                }
            })
            .collect())
    }
}

/// A symbol and the functions inlined at the address, innermost first. blazesym lists
/// inlined functions outermost first, each with its own location (`sym.code_info` is the
/// location in the outer function, of the call to the first inlined one).
fn sym_frames(sym: &Sym<'_>, module: &str) -> Vec<Frame> {
    let mut frames: Vec<Frame> = sym
        .inlined
        .iter()
        .rev()
        .map(|inlined| native_frame(&inlined.name, inlined.code_info.as_ref(), module))
        .collect();
    frames.push(native_frame(&sym.name, sym.code_info.as_deref(), module));
    frames
}

fn native_frame(function: &str, code_info: Option<&CodeInfo<'_>>, module: &str) -> Frame {
    let (file, line) = code_info.map_or((String::new(), 0), |info| {
        (info.to_path().to_string_lossy().into_owned(), info.line.unwrap_or(0))
    });
    Frame { function: demangle(function), module: module.to_string(), file, line, kind: FrameKind::Native }
}

/// The readable name of a symbol, demangled only when it is mangled: Itanium C++ names
/// start with `_Z`, Rust's with `_R` (v0) or `_ZN…17h<hash>E` (legacy). Anything else
/// (C names such as `f`, `i` or `d`, which the C++ grammar reads as types) is kept.
/// The output matches blazesym's own demangling: Rust paths without the hash, C++ with
/// parameter types.
pub(crate) fn demangle(name: &str) -> String {
    if (name.starts_with("_R") || name.starts_with("_Z"))
        && let Ok(rust) = rustc_demangle::try_demangle(name)
    {
        return format!("{rust:#}");
    }
    if name.starts_with("_Z")
        && let Ok(symbol) = cpp_demangle::Symbol::new(name)
        && let Ok(text) = symbol.demangle()
    {
        return text;
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::demangle;

    #[test]
    fn c_names_are_not_demangled() {
        // The hazard: the C++ demangler alone reads `f` as a type.
        let float = cpp_demangle::Symbol::new("f").ok().and_then(|s| s.demangle().ok());
        assert_eq!(float.as_deref(), Some("float"));
        // Each of these is a type or substitution in the Itanium grammar.
        for name in ["f", "i", "d", "v", "c", "main", "malloc", "Sv", "St", "leak_mappings"] {
            assert_eq!(demangle(name), name);
        }
    }

    #[test]
    fn mangled_names_are_demangled() {
        assert_eq!(demangle("_Z3fooi"), "foo(int)");
        assert_eq!(demangle("_ZN5space3fooEibc"), "space::foo(int, bool, char)");
        assert_eq!(demangle("_ZN4core3fmt5write17h0123456789abcdefE"), "core::fmt::write");
        assert_eq!(demangle("_RNvCs15kBYyAo9fc_7mycrate4main"), "mycrate::main");
        // Mangled-looking but invalid: kept as it is.
        assert_eq!(demangle("_Zfoo"), "_Zfoo");
        assert_eq!(demangle("_Rx"), "_Rx");
    }
}
