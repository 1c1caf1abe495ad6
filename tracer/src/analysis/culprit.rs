//! The culprit of a stack: the first frame from the leaf that is the application's, the
//! one a person edits to fix the leak. And which stacks only extended a segment (a malloc
//! arena, V8's heap pages) rather than allocated memory they hold.

use regex::Regex;

use crate::report::{Frame, FrameKind, SegmentKind, Source};

/// Frames the user asked to skip (`--culprit-skip REGEX`), matched against
/// [`Frame::label`] and the module.
#[derive(Clone, Debug, Default)]
pub struct CulpritRules {
    skip: Vec<Regex>,
}

impl CulpritRules {
    /// # Errors
    /// A pattern that is not a valid regular expression.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, regex::Error> {
        let skip = patterns.iter().map(|p| Regex::new(p.as_ref())).collect::<Result<_, _>>()?;
        Ok(Self { skip })
    }

    fn skipped(&self, frame: &Frame) -> bool {
        !self.skip.is_empty() && {
            let label = frame.label();
            self.skip.iter().any(|re| re.is_match(&label) || re.is_match(&frame.module))
        }
    }
}

/// Native modules that are runtime, not application: the C library and loader, C++
/// runtime, allocators, and node itself (V8, libuv, OpenSSL and node's C++ are linked
/// into the node executable or libnode).
fn runtime_module(module: &str) -> bool {
    const RUNTIME: [&str; 14] = [
        "libc.so",
        "libc-",
        "ld-linux",
        "libm.so",
        "libpthread",
        "libstdc++",
        "libgcc_s",
        "libjemalloc",
        "libtcmalloc",
        "libmimalloc",
        "libnode.so",
        "libuv.so",
        "libcrypto.so",
        "libssl.so",
    ];
    let name = module.rsplit('/').next().unwrap_or(module);
    name == "node" || name == "nodejs" || RUNTIME.iter().any(|r| name.starts_with(r))
}

/// Functions of the runtime whatever their module: a statically linked program carries
/// its C library and allocator in its own executable, and perf-map frames have no module.
fn runtime_function(function: &str) -> bool {
    const PREFIXES: [&str; 16] = [
        "v8::",
        "node::",
        "Builtins_",
        "uv_",
        "uv__",
        "std::",
        "__libc_",
        "_dl_",
        "__GI_",
        "_int_",
        "__mem",
        "__str",
        "operator new",
        "operator delete",
        "tcache_",
        "sysmalloc",
    ];
    const ALLOCATOR: [&str; 14] = [
        "malloc",
        "calloc",
        "realloc",
        "reallocarray",
        "free",
        "memalign",
        "_mid_memalign",
        "aligned_alloc",
        "posix_memalign",
        "valloc",
        "pvalloc",
        "mmap",
        "__mmap",
        "mmap64",
    ];
    PREFIXES.iter().any(|p| function.starts_with(p))
        || ALLOCATOR.contains(&function)
        || function.starts_with("0x")
        || function.starts_with('[')
        || function.is_empty()
}

/// A JS frame of node itself (`node:internal/...`, `node:buffer`, `internal/...`).
fn node_internal_js(frame: &Frame) -> bool {
    let file = frame.file.as_str();
    file.starts_with("node:")
        || file.starts_with("internal/")
        || file.is_empty() && frame.function.contains(" node:")
}

fn in_node_modules(frame: &Frame) -> bool {
    frame.file.contains("/node_modules/") || frame.file.starts_with("node_modules/")
}

/// How much a frame looks like application code: 2 = the application's own, 1 = a
/// dependency (`node_modules`), 0 = runtime or unknown.
fn rank(frame: &Frame, rules: &CulpritRules) -> u8 {
    if rules.skipped(frame) {
        return 0;
    }
    match frame.kind {
        FrameKind::Js if node_internal_js(frame) => 0,
        FrameKind::Js if in_node_modules(frame) => 1,
        FrameKind::Native if runtime_module(&frame.module) || runtime_function(&frame.function) => 0,
        FrameKind::Js | FrameKind::Native => 2,
        FrameKind::Kernel | FrameKind::Unknown => 0,
    }
}

/// Index of the culprit in `frames` (leaf first): the first application frame; else the
/// first frame in a dependency; else the first JS frame; else the leaf. `None` for an
/// empty stack.
#[must_use]
pub fn culprit_index(frames: &[Frame], rules: &CulpritRules) -> Option<usize> {
    if frames.is_empty() {
        return None;
    }
    let ranks: Vec<u8> = frames.iter().map(|f| rank(f, rules)).collect();
    ranks
        .iter()
        .position(|&r| r == 2)
        .or_else(|| ranks.iter().position(|&r| r == 1))
        .or_else(|| frames.iter().position(|f| f.kind == FrameKind::Js && !rules.skipped(f)))
        .or(Some(0))
}

/// Index of the culprit's caller: the next application frame towards the root. Stacks
/// of one culprit with different callers are different suspects: an allocation helper
/// shared by a leak and by churn is not one suspect.
#[must_use]
pub fn caller_index(frames: &[Frame], culprit: Option<usize>, rules: &CulpritRules) -> Option<usize> {
    let c = culprit?;
    if frames.get(c).is_none_or(|f| rank(f, rules) < 2) {
        return None;
    }
    frames.iter().enumerate().skip(c + 1).find(|(_, f)| rank(f, rules) == 2).map(|(i, _)| i)
}

/// What makes two frames the same function, whatever line of it is running.
#[must_use]
pub fn function_key(frame: &Frame) -> (String, String, String, FrameKind) {
    (frame.function.clone(), frame.module.clone(), frame.file.clone(), frame.kind)
}

/// The culprit frame of a stack, or a placeholder for an empty one.
#[must_use]
pub fn culprit(frames: &[Frame], rules: &CulpritRules) -> Frame {
    culprit_index(frames, rules)
        .and_then(|i| frames.get(i))
        .cloned()
        .unwrap_or_else(|| Frame { function: "[no stack captured]".into(), ..Frame::default() })
}

/// V8's heap management: page allocation, spaces, and the garbage collectors. Not
/// `Heap::AllocateExternalBackingStore`: an `ArrayBuffer`'s backing store (a Buffer) is
/// malloc'd or mapped for the code that made the Buffer, outside V8's pages.
fn v8_heap_function(function: &str) -> bool {
    const PARTS: [&str; 16] = [
        "MemoryAllocator",
        "PagedSpace",
        "NewSpace",
        "SemiSpace",
        "LargeObjectSpace",
        "Scavenger",
        "MarkCompact",
        "Sweeper",
        "ConcurrentMarking",
        "MemoryChunk",
        "Evacuat",
        "VirtualMemory",
        "CodeRange",
        "ReadOnlySpace",
        "PageAllocator",
        "MemoryReducer",
    ];
    (function.starts_with("v8::internal::") || function.starts_with("v8::base::"))
        && PARTS.iter().any(|p| function.contains(p))
}

/// glibc's malloc internals that grow an arena or write into its fresh pages.
fn arena_function(function: &str, touched: bool) -> bool {
    const GROW: [&str; 8] = [
        "new_heap",
        "alloc_new_heap",
        "grow_heap",
        "_int_new_arena",
        "arena_get2",
        "sbrk",
        "__sbrk",
        "__brk",
    ];
    const TOUCH: [&str; 10] = [
        "_int_malloc",
        "_int_realloc",
        "_int_memalign",
        "_int_free",
        "malloc_consolidate",
        "sysmalloc",
        "tcache_init",
        "__libc_malloc",
        "__libc_calloc",
        "__libc_realloc",
    ];
    GROW.contains(&function) || touched && TOUCH.contains(&function)
}

/// The segment whose growth a stack's memory is, if it is one: memory at the program
/// break is a malloc arena's; a mapping made by V8's heap or glibc's arena code is a
/// segment's page; a page first touched by V8's heap code or by malloc itself belongs to
/// a segment, whoever holds the objects in it. Only frames on the leaf side of the culprit
/// count: an application function that calls into V8 to allocate a JS object is the
/// culprit whatever V8 does below it.
#[must_use]
pub fn segment_of(source: Source, frames: &[Frame], culprit: Option<usize>) -> Option<SegmentKind> {
    match source {
        Source::Brk => return Some(SegmentKind::MallocArena),
        Source::Malloc | Source::JsHeap => return None,
        Source::Mmap | Source::Faults => {}
    }
    // A culprit that is only the runtime fallback (no application frame) hides nothing.
    let end = match culprit {
        Some(c) if frames.get(c).is_some_and(|f| rank(f, &CulpritRules::default()) > 0) => c,
        _ => frames.len(),
    };
    let leaf_side = &frames[..end];
    let touched = source == Source::Faults;
    // The frame nearest the leaf decides between V8's pages and a Buffer's backing store:
    // making a backing store can start a garbage collection that maps V8 pages.
    let backing_store =
        |f: &Frame| f.function.contains("BackingStore") || f.function.contains("ArrayBufferAllocator");
    let nearest = leaf_side.iter().find(|f| v8_heap_function(&f.function) || backing_store(f));
    if nearest.is_some_and(|f| !backing_store(f)) {
        Some(SegmentKind::V8Heap)
    } else if leaf_side.iter().any(|f| arena_function(&f.function, touched)) {
        Some(SegmentKind::MallocArena)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(function: &str, module: &str) -> Frame {
        Frame {
            function: function.into(),
            module: module.into(),
            kind: FrameKind::Native,
            ..Frame::default()
        }
    }

    fn js(function: &str, file: &str, line: u32) -> Frame {
        Frame { function: function.into(), file: file.into(), line, kind: FrameKind::Js, ..Frame::default() }
    }

    fn none() -> CulpritRules {
        CulpritRules::default()
    }

    #[test]
    fn skips_libc_v8_and_node_internals() {
        let frames = vec![
            native("__memset_avx512_unaligned_erms", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            native("v8::internal::Builtin_TypedArrayPrototypeFill(int, unsigned long*)", "/usr/bin/node"),
            native("Builtins_CEntry_Return1_ArgvOnStack_BuiltinExit", ""),
            js("_fill", "node:buffer", 1031),
            js("alloc", "node:buffer", 391),
            js("rememberOrder", "/srv/server.js", 30),
            js("placeOrder", "/srv/server.js", 46),
        ];
        assert_eq!(culprit(&frames, &none()).function, "rememberOrder");
    }

    #[test]
    fn node_modules_only_when_nothing_else() {
        let express = js("handle", "/srv/node_modules/express/lib/router/layer.js", 95);
        let app = js("placeOrder", "/srv/server.js", 46);
        assert_eq!(culprit(&[express.clone(), app], &none()).function, "placeOrder");
        let alone = [js("_fill", "node:buffer", 1), express];
        assert_eq!(culprit(&alone, &none()).function, "handle");
    }

    #[test]
    fn native_application_frame_outside_runtime() {
        let frames = vec![
            native("__mmap", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            native("sysmalloc", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            native("leak_block", "/tmp/fixture"),
            native("main", "/tmp/fixture"),
        ];
        assert_eq!(culprit(&frames, &none()).function, "leak_block");
        let rules = CulpritRules::new(&["^leak_"]).expect("valid regex");
        assert_eq!(culprit(&frames, &rules).function, "main", "--culprit-skip adds frames to skip");
    }

    #[test]
    fn a_static_program_s_allocator_is_runtime() {
        let frames = vec![
            native("_mid_memalign", "/tmp/malloc_leak_static"),
            native("aligned_alloc", "/tmp/malloc_leak_static"),
            native("leak_aligned_alloc", "/tmp/malloc_leak_static"),
            native("main", "/tmp/malloc_leak_static"),
        ];
        assert_eq!(culprit(&frames, &none()).function, "leak_aligned_alloc");
    }

    #[test]
    fn runtime_only_stack_falls_back_to_the_first_js_frame_then_the_leaf() {
        let frames = vec![
            native("v8::internal::Heap::AllocateRaw", "/usr/bin/node"),
            js("push", "node:internal/x", 3),
        ];
        assert_eq!(culprit(&frames, &none()).function, "push");
        let native_only = vec![native("v8::internal::Scavenger::Scavenge", "/usr/bin/node")];
        assert_eq!(culprit(&native_only, &none()).function, "v8::internal::Scavenger::Scavenge");
        assert_eq!(culprit(&[], &none()).function, "[no stack captured]");
    }

    #[test]
    fn segments_by_view_and_frames() {
        let gc = vec![
            native("__mmap", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            native("v8::internal::MemoryAllocator::AllocatePage(int)", "/usr/bin/node"),
            native("v8::internal::Scavenger::Process()", "/usr/bin/node"),
        ];
        let c = culprit_index(&gc, &none());
        assert_eq!(segment_of(Source::Mmap, &gc, c), Some(SegmentKind::V8Heap));
        assert_eq!(segment_of(Source::Faults, &gc, c), Some(SegmentKind::V8Heap));
        assert_eq!(segment_of(Source::Malloc, &gc, c), None);
        let app = vec![native("__mmap", "libc.so.6"), native("sysmalloc", "libc.so.6"), native("keep", "/a")];
        let c = culprit_index(&app, &none());
        assert_eq!(segment_of(Source::Mmap, &app, c), None, "a large block mmapped by malloc is exact");
        assert_eq!(
            segment_of(Source::Faults, &app, c),
            Some(SegmentKind::MallocArena),
            "malloc wrote the page"
        );
        assert_eq!(segment_of(Source::Brk, &app, c), Some(SegmentKind::MallocArena));
        let arena =
            vec![native("__mmap", "libc.so.6"), native("alloc_new_heap", "libc.so.6"), native("keep", "/a")];
        let c = culprit_index(&arena, &none());
        assert_eq!(segment_of(Source::Mmap, &arena, c), Some(SegmentKind::MallocArena));
        let buffer = vec![
            native("__GI___mmap64", "libc.so.6"),
            native("sysmalloc_mmap", "libc.so.6"),
            native("node::NodeArrayBufferAllocator::AllocateUninitialized(unsigned long)", "/usr/bin/node"),
            native(
                "v8::internal::Heap::AllocateExternalBackingStore(std::function<void* (unsigned long)> const&)",
                "/usr/bin/node",
            ),
            native("v8::internal::BackingStore::Allocate(v8::internal::Isolate*)", "/usr/bin/node"),
            js("rememberOrder", "/srv/server.js", 30),
        ];
        let c = culprit_index(&buffer, &none());
        assert_eq!(
            segment_of(Source::Mmap, &buffer, c),
            None,
            "a Buffer's backing store is the Buffer maker's"
        );
        let gc_for_buffer = vec![
            native("__GI___mmap64", "libc.so.6"),
            native("v8::internal::MemoryAllocator::AllocatePage(int)", "/usr/bin/node"),
            native("v8::internal::Heap::CollectGarbage(int)", "/usr/bin/node"),
            native("v8::internal::Heap::AllocateExternalBackingStore(int)", "/usr/bin/node"),
            native("v8::internal::BackingStore::Allocate(v8::internal::Isolate*)", "/usr/bin/node"),
            js("churnLarge", "/srv/server.js", 31),
        ];
        let c = culprit_index(&gc_for_buffer, &none());
        assert_eq!(
            segment_of(Source::Mmap, &gc_for_buffer, c),
            Some(SegmentKind::V8Heap),
            "a collection's pages"
        );
        let memset_by_app = vec![native("__memset_avx2", "libc.so.6"), native("keep", "/a")];
        let c = culprit_index(&memset_by_app, &none());
        assert_eq!(segment_of(Source::Faults, &memset_by_app, c), None);
    }
}
