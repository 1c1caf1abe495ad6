//! A function's name and source position: `SharedFunctionInfo::DebugName()` (the name, or
//! the name V8 inferred for an anonymous function, as perf maps write it) and its start
//! position, both kept in the function's `ScopeInfo` once it is compiled.

use super::constants::{Layout, ScopeInfoLayout};
use super::heap::{Heap, HeapError, object_address, smi, word};
use super::strings::read_string;

/// Longest function name read (longer ones are cut).
const MAX_NAME: usize = 1024;

/// What a `SharedFunctionInfo` says about its function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FunctionInfo {
    /// `DebugName`: empty for a truly anonymous function.
    pub name: String,
    /// The Script, tagged, when the function has one.
    pub script: Option<u64>,
    /// Character offset of the function in its script.
    pub start_position: Option<i64>,
}

/// The slots of a `ScopeInfo` that matter here, as tagged words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ScopeSlots {
    /// `function_variable_info.name`: a String, or Smi 0 for none.
    pub function_name: Option<u64>,
    /// `inferred_function_name`: a String or undefined.
    pub inferred_name: Option<u64>,
    pub start: Option<i64>,
    pub end: Option<i64>,
}

const FUNCTION_SCOPE: u64 = 2;
const SCOPES_WITH_POSITIONS: [u64; 4] = [1, FUNCTION_SCOPE, 3, 4]; // eval, function, module, script

fn bits(value: u64, (shift, width): (u32, u32)) -> u64 {
    (value >> shift) & ((1 << width) - 1)
}

/// Decodes the tagged words of a `ScopeInfo` after its map (`words[0]` is the flags).
/// Returns how many words the slots need when `words` is too short.
pub(crate) fn scope_slots(layout: &ScopeInfoLayout, words: &[u64]) -> Result<ScopeSlots, usize> {
    let at = |i: u64| words.get(i as usize).copied();
    let (Some(flags), Some(locals)) = (at(0).and_then(smi), at(layout.idx_context_local_count).and_then(smi))
    else {
        return Err(layout.idx_first_vars as usize);
    };
    let flags = flags as u64;
    let locals = u64::try_from(locals).map_err(|_| 0usize)?;
    let mut index = layout.idx_first_vars;
    index += if locals < layout.max_inlined_locals { 2 * locals } else { 1 + locals };
    if bits(flags, (layout.flag_saved_class_variable, 1)) == 1 {
        index += 1;
    }
    if let Some(receiver) = layout.flag_receiver
        && matches!(bits(flags, receiver), 1 | 2)
    {
        index += 1;
    }
    // Everything below fits in 6 more words.
    if words.len() < (index + 6) as usize {
        return Err((index + 6) as usize);
    }
    let mut slots = ScopeSlots::default();
    if bits(flags, layout.flag_function_variable) != 0 {
        slots.function_name = at(index);
        index += 2;
    }
    if bits(flags, (layout.flag_inferred_name, 1)) == 1 {
        slots.inferred_name = at(index);
        index += 1;
    }
    if SCOPES_WITH_POSITIONS.contains(&bits(flags, layout.flag_scope_type)) {
        slots.start = at(index).and_then(smi);
        slots.end = at(index + 1).and_then(smi);
    }
    Ok(slots)
}

/// Reads the `ScopeInfo` whose untagged address is `addr`.
fn read_scope_info(heap: &mut Heap<'_>, addr: u64) -> Result<ScopeSlots, HeapError> {
    let layout = heap.layout.scope_info;
    let mut want = (layout.idx_first_vars as usize + 6) * 8;
    for _ in 0..2 {
        let bytes = heap.read(addr + 8, want)?;
        let words: Vec<u64> = (0..bytes.len() / 8).map(|i| word(&bytes, i as u64 * 8)).collect();
        match scope_slots(&layout, &words) {
            Ok(slots) => return Ok(slots),
            // Context locals can be thousands; a ScopeInfo that large is not believed.
            Err(need) if need * 8 > want && need < 4096 => want = need * 8,
            Err(_) => break,
        }
    }
    Err(HeapError::Malformed("ScopeInfo"))
}

/// Name, script and start position of the `SharedFunctionInfo` `sfi` (tagged), whose
/// header words have been read already (`header`, from the object's start).
pub(crate) fn function_info(heap: &mut Heap<'_>, header: &[u8]) -> Result<FunctionInfo, HeapError> {
    let layout: &Layout = heap.layout;
    let name_or_scope = word(header, layout.sfi_name_or_scope_info);
    let script = word(header, layout.sfi_script);
    let mut info = FunctionInfo::default();
    if object_address(script).is_some() {
        let (_, script_type) = heap.object(script)?;
        if script_type == layout.type_script {
            info.script = Some(script);
        }
    }
    let (scope_addr, scope_type) = heap.object(name_or_scope)?;
    if scope_type == layout.type_scope_info {
        let slots = read_scope_info(heap, scope_addr)?;
        info.start_position = slots.start;
        let name = match slots.function_name {
            Some(name) if object_address(name).is_some() => read_string(heap, name, MAX_NAME).ok(),
            _ => None,
        };
        info.name = match name {
            Some(name) if !name.is_empty() => name,
            _ => inferred(heap, slots.inferred_name),
        };
    } else if layout.is_string(scope_type) {
        // Not compiled (or an API function): the name itself.
        info.name = read_string(heap, name_or_scope, MAX_NAME)?;
    } else {
        return Err(HeapError::WrongType { expected: "ScopeInfo or String", found: scope_type });
    }
    Ok(info)
}

/// The inferred name (`obj.method = function () {}` is "obj.method"), if it is a string.
fn inferred(heap: &mut Heap<'_>, slot: Option<u64>) -> String {
    let Some(tagged) = slot.filter(|&t| object_address(t).is_some()) else { return String::new() };
    match heap.object(tagged) {
        Ok((_, t)) if heap.layout.is_string(t) => read_string(heap, tagged, MAX_NAME).unwrap_or_default(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::heap::tests::Capture;
    use super::*;

    /// `SharedFunctionInfos` of node 20 functions of every kind, with the name and start
    /// position (1-based line:column in the comment) node's perf map gave them.
    #[test]
    fn names_and_positions_of_captured_functions() {
        let mut capture = Capture::node20(include_str!("testdata/functions-node20.txt"));
        let cases = capture.expected.clone();
        assert!(cases.len() >= 10, "captures of many kinds of functions");
        let mut heap = capture.heap();
        for (sfi, expected) in cases {
            let (name, start) = expected.rsplit_once(' ').expect("NAME START");
            let header = heap.read(sfi & !3, 56).expect("SFI captured");
            let info = function_info(&mut heap, &header).unwrap_or_else(|e| panic!("SFI {sfi:#x}: {e}"));
            assert_eq!(info.name, name, "name of SFI {sfi:#x}");
            assert_eq!(info.start_position, Some(start.parse().expect("start")), "start of {name}");
            assert!(info.script.is_some(), "{name} has a script");
        }
    }

    #[test]
    fn scope_slots_by_flags() {
        let layout = Capture::node20("").layout.scope_info;
        let smi = |v: i64| (v as u64) << 32;
        let string = 0x1000_0001;
        let undefined = 0x2000_0001;
        // A sloppy function that names itself (function_variable UNUSED) and infers no
        // name: flags 0x0001_71c2 as in `function decl(a) {}`.
        let words = [smi(0x0001_71c2), smi(1), smi(0), string, smi(-1), undefined, smi(103), smi(120), 0, 0];
        let slots = scope_slots(&layout, &words).expect("decodes");
        assert_eq!(slots.function_name, Some(string));
        assert_eq!(slots.inferred_name, Some(undefined));
        assert_eq!((slots.start, slots.end), (Some(103), Some(120)));

        // Two context locals shift the optional slots by two names and two infos.
        let mut words = vec![smi(0x0001_71c2), smi(1), smi(2), string, string, smi(0), smi(0)];
        words.extend([string, smi(-1), undefined, smi(5), smi(9), 0]);
        assert_eq!(scope_slots(&layout, &words).expect("decodes").start, Some(5));

        // A saved class variable takes one slot before the function variable.
        let flags = 0x0001_71c2 | 1 << 10;
        let words = [smi(flags), smi(0), smi(0), smi(7), string, smi(-1), undefined, smi(1), smi(2), 0];
        assert_eq!(scope_slots(&layout, &words).expect("decodes").function_name, Some(string));

        // Too short: says how much is needed.
        assert_eq!(scope_slots(&layout, &words[..5]), Err(10));
        assert!(scope_slots(&layout, &[string, 0, 0]).is_err(), "flags must be a Smi");
    }
}
