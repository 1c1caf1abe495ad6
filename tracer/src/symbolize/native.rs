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
            .enable_demangling(true)
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
    Frame { function: function.to_string(), module: module.to_string(), file, line, kind: FrameKind::Native }
}
