//! The heap layout of one V8 build, from the `v8dbg_*` constants its file exports
//! ([`super::elf`]).
//!
//! Some layout facts have no constant in some releases (V8 11 lost most of `Code`'s);
//! those are keyed by the V8 version, as opentelemetry-ebpf-profiler does, and only for
//! the releases memtrace was checked on.

use std::collections::HashMap;
use std::ops::Range;

pub(crate) use super::elf::ElfMetadata;

/// V8 releases whose heap layout memtrace knows: 10.2 (node 18) up to 11.x (node 20/21).
const SUPPORTED: Range<(u32, u32)> = (10, 2)..(12, 0);

/// Why JS frames are not read from the heap of this process.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Refusal {
    #[error("{0} has no v8dbg_* symbols (stripped, or not a V8 embedder)")]
    NoMetadata(String),
    #[error("cannot read {file}: {why}")]
    Unreadable { file: String, why: String },
    #[error("the V8 version symbols are missing")]
    NoVersion,
    #[error(
        "V8 {0}.{1}.{2} has a heap layout memtrace does not know (it knows V8 10.2 to 11.x: node 18 to 21)"
    )]
    UnknownVersion(u32, u32, u32),
    #[error(
        "V8 is built with pointer compression (tagged values are {0} bytes); only 8-byte tagged values are read"
    )]
    PointerCompression(i64),
    #[error("V8 uses a tagging scheme memtrace does not know ({0})")]
    Tagging(&'static str),
    #[error("the constant v8dbg_{0} is missing")]
    Missing(&'static str),
}

/// The heap layout of one V8 build: every offset the frame reader uses, in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::struct_field_names, reason = "field names follow V8's class and field names")]
pub(crate) struct Layout {
    pub version: (u32, u32, u32),
    // Frame slots, relative to the frame pointer.
    pub fp_context: i64,
    pub fp_function: i64,
    pub fp_bytecode_array: i64,
    pub fp_bytecode_offset: i64,
    // Instance types.
    pub js_function_types: Range<u16>,
    pub type_sfi: u16,
    pub type_scope_info: u16,
    pub type_script: u16,
    pub type_bytecode_array: u16,
    pub type_byte_array: u16,
    pub type_fixed_array: u16,
    pub type_code: u16,
    pub type_interpreter_data: Option<u16>,
    pub first_nonstring_type: u16,
    pub strings: StringTags,
    // Object fields.
    pub map: u64,
    pub map_instance_type: u64,
    pub js_function_shared: u64,
    pub js_function_code: u64,
    pub sfi_function_data: u64,
    pub sfi_name_or_scope_info: u64,
    pub sfi_script: u64,
    pub script_source: u64,
    pub script_name: u64,
    pub script_line_offset: u64,
    pub script_line_ends: u64,
    pub array_length: u64,
    pub fixed_array_data: u64,
    pub string_length: u64,
    pub seq_one_byte_chars: u64,
    pub seq_two_byte_chars: u64,
    pub cons_first: u64,
    pub cons_second: u64,
    pub sliced_parent: u64,
    pub sliced_offset: u64,
    pub thin_actual: u64,
    /// `ExternalString`'s cached pointer to its characters (absent in uncached ones).
    pub external_data: u64,
    pub bytecode_array_data: u64,
    pub bytecode_array_positions: u64,
    pub interpreter_data_bytecode: u64,
    pub code: CodeLayout,
    pub scope_info: ScopeInfoLayout,
}

/// Where a `Code` object keeps its instructions and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CodeLayout {
    /// Offset of the instruction start: a pointer field (V8 ≥ 11.1.204) or, before, the
    /// instructions themselves follow the header there.
    pub instruction_start: u64,
    pub start_is_pointer: bool,
    pub instruction_size: u64,
    pub flags: u64,
    pub kind_mask: u32,
    pub kind_shift: u32,
    pub kind_baseline: u32,
    /// `bytecode_or_interpreter_data` of baseline code (shares the deoptimization data slot).
    pub bytecode: u64,
    /// Bytes between the start of the object in front of the instructions (the
    /// `InstructionStream`, or the Code itself before V8 11) and the instructions.
    pub header_size: u64,
    /// The Code's `instruction_stream` field (V8 11).
    pub instruction_stream: u64,
    /// Index of the `SharedFunctionInfo` in optimized code's deoptimization data.
    pub deopt_sfi_index: u64,
}

/// String instance-type bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StringTags {
    pub representation_mask: u16,
    pub seq: u16,
    pub cons: u16,
    pub external: u16,
    pub sliced: u16,
    pub thin: u16,
    pub encoding_mask: u16,
    pub one_byte: u16,
    /// Set in external strings that do not cache their data pointer.
    pub uncached_external: u16,
}

/// The slots of a `ScopeInfo` (a `HeapObject` since V8 9.1): indices of tagged words after
/// the map, and the bits of its flags word that say which optional slots are present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScopeInfoLayout {
    pub idx_context_local_count: u64,
    pub idx_first_vars: u64,
    /// Beyond this many context locals the names live in a hash table, not inline.
    pub max_inlined_locals: u64,
    pub flag_scope_type: (u32, u32),
    pub flag_saved_class_variable: u32,
    pub flag_function_variable: (u32, u32),
    pub flag_inferred_name: u32,
    /// `receiver_info` slot present when the receiver is STACK or CONTEXT (V8 < 10.x).
    pub flag_receiver: Option<(u32, u32)>,
}

impl Layout {
    /// Checks and completes the constants. Refuses layouts memtrace does not know.
    pub fn new(meta: &ElfMetadata) -> Result<Self, Refusal> {
        let c = &meta.constants;
        let get = |name: &'static str| c.get(name).copied().ok_or(Refusal::Missing(name));
        let version = meta.version.ok_or(Refusal::NoVersion)?;
        let (major, minor, build) = version;
        if !SUPPORTED.contains(&(major, minor)) {
            return Err(Refusal::UnknownVersion(major, minor, build));
        }
        let tagged = get("TaggedSize")?;
        if tagged != 8 {
            return Err(Refusal::PointerCompression(tagged));
        }
        if get("HeapObjectTag")? != 1 || get("HeapObjectTagMask")? != 3 {
            return Err(Refusal::Tagging("heap object tag"));
        }
        if get("SmiTag")? != 0 || get("SmiTagMask")? != 1 || get("SmiShiftSize")? != 31 {
            return Err(Refusal::Tagging("small integers"));
        }
        let ty = |name: &'static str| get(name).map(|v| v as u16);
        let off = |name: &'static str| get(name).map(|v| v as u64);
        let either = |a: &'static str, b: &'static str| {
            c.get(a).or_else(|| c.get(b)).copied().ok_or(Refusal::Missing(a))
        };
        let at_least = |v: (u32, u32, u32)| version >= v;

        let fp_function = get("off_fp_function")?;
        let fp_bytecode_array = c.get("off_fp_bytecode_array").copied().unwrap_or(fp_function - 16);
        let js_function = ty("type_JSFunction__JS_FUNCTION_TYPE")?;
        let js_function_shared = off("class_JSFunction__shared__SharedFunctionInfo")?;
        let code_layout = code_layout(c, version)?;
        Ok(Self {
            version,
            fp_context: get("off_fp_context")?,
            fp_function,
            fp_bytecode_array,
            fp_bytecode_offset: c.get("off_fp_bytecode_offset").copied().unwrap_or(fp_bytecode_array - 8),
            js_function_types: js_function..next_listed_type(c, js_function),
            type_sfi: ty("type_SharedFunctionInfo__SHARED_FUNCTION_INFO_TYPE")?,
            type_scope_info: ty("type_ScopeInfo__SCOPE_INFO_TYPE")?,
            type_script: ty("type_Script__SCRIPT_TYPE")?,
            type_bytecode_array: ty("type_BytecodeArray__BYTECODE_ARRAY_TYPE")?,
            type_byte_array: ty("type_ByteArray__BYTE_ARRAY_TYPE")?,
            type_fixed_array: ty("type_FixedArray__FIXED_ARRAY_TYPE")?,
            type_code: ty("type_Code__CODE_TYPE")?,
            type_interpreter_data: c.get("type_InterpreterData__INTERPRETER_DATA_TYPE").map(|&v| v as u16),
            first_nonstring_type: ty("FirstNonstringType")?,
            strings: StringTags {
                representation_mask: ty("StringRepresentationMask")?,
                seq: ty("SeqStringTag")?,
                cons: ty("ConsStringTag")?,
                external: ty("ExternalStringTag")?,
                sliced: ty("SlicedStringTag")?,
                thin: ty("ThinStringTag")?,
                encoding_mask: ty("StringEncodingMask")?,
                one_byte: ty("OneByteStringTag")?,
                // kUncachedExternalStringMask, unchanged since V8 6.
                uncached_external: 0x10,
            },
            map: off("class_HeapObject__map__Map")?,
            map_instance_type: off("class_Map__instance_type__uint16_t")?,
            js_function_shared,
            js_function_code: match either("class_JSFunction__code__CodeT", "class_JSFunction__code__Code") {
                Ok(v) => v as u64,
                // V8 11.7.368 moved `code` in front of `shared`.
                Err(_) if at_least((11, 7, 368)) => js_function_shared - 8,
                Err(_) => js_function_shared + 24,
            },
            sfi_function_data: off("class_SharedFunctionInfo__function_data__Object")?,
            sfi_name_or_scope_info: off("class_SharedFunctionInfo__name_or_scope_info__Object")?,
            sfi_script: either(
                "class_SharedFunctionInfo__script_or_debug_info__HeapObject",
                "class_SharedFunctionInfo__script_or_debug_info__Object",
            )? as u64,
            script_source: off("class_Script__source__Object")?,
            script_name: off("class_Script__name__Object")?,
            // line_offset follows name in every release since V8 5.
            script_line_offset: off("class_Script__name__Object")? + 8,
            script_line_ends: off("class_Script__line_ends__Object")?,
            array_length: off("class_FixedArrayBase__length__SMI")?,
            fixed_array_data: off("class_FixedArray__data__uintptr_t")?,
            string_length: off("class_String__length__int32_t")?,
            seq_one_byte_chars: off("class_SeqOneByteString__chars__char")?,
            seq_two_byte_chars: off("class_SeqTwoByteString__chars__char")?,
            cons_first: off("class_ConsString__first__String")?,
            cons_second: off("class_ConsString__second__String")?,
            sliced_parent: off("class_SlicedString__parent__String")?,
            sliced_offset: off("class_SlicedString__offset__SMI")?,
            thin_actual: off("class_ThinString__actual__String")?,
            // `resource`, then the cached `resource_data`.
            external_data: off("class_ExternalString__resource__Object")? + 8,
            bytecode_array_data: off("class_BytecodeArray__data__uintptr_t")?,
            // constant_pool, handler_table, source_position_table follow the length
            // (the constant was lost in V8 9.4).
            bytecode_array_positions: off("class_FixedArrayBase__length__SMI")? + 24,
            // InterpreterData { bytecode_array, interpreter_trampoline } after the map.
            interpreter_data_bytecode: 8,
            code: code_layout,
            scope_info: scope_info_layout(c, version)?,
        })
    }

    pub fn is_js_function(&self, instance_type: u16) -> bool {
        self.js_function_types.contains(&instance_type)
    }

    pub fn is_string(&self, instance_type: u16) -> bool {
        instance_type < self.first_nonstring_type
    }
}

/// The subclasses of `JSFunction` (class constructors, builtin constructors) have instance
/// types right after `JS_FUNCTION_TYPE` and no constants of their own: the range ends at the
/// next type that has one.
fn next_listed_type(c: &HashMap<String, i64>, js_function: u16) -> u16 {
    c.iter()
        .filter(|(name, _)| name.starts_with("type_"))
        .map(|(_, &v)| v as u16)
        .filter(|&v| v > js_function)
        .min()
        .unwrap_or(js_function + 1)
}

fn code_layout(c: &HashMap<String, i64>, version: (u32, u32, u32)) -> Result<CodeLayout, Refusal> {
    let get = |name: &'static str| c.get(name).map(|&v| v as u64);
    let kind_mask = get("CodeKindFieldMask").ok_or(Refusal::Missing("CodeKindFieldMask"))? as u32;
    let kind_shift = get("CodeKindFieldShift").unwrap_or(0) as u32;
    let kind_baseline = get("CodeKindBaseline").ok_or(Refusal::Missing("CodeKindBaseline"))? as u32;
    let start_is_pointer = version >= (11, 1, 204);
    let deopt_sfi_index = get("DeoptimizationDataSharedFunctionInfoIndex").unwrap_or(6);
    // The deoptimization data slot, right after relocation_info (no constant in V8 10).
    let bytecode = get("class_Code__bytecode_or_interpreter_data__HeapObject")
        .or_else(|| get("class_Code__deoptimization_data__FixedArray"))
        .unwrap_or(16);
    if let (Some(start), Some(size), Some(flags)) = (
        get("class_Code__instruction_start__uintptr_t"),
        get("class_Code__instruction_size__int"),
        get("class_Code__flags__uint32_t"),
    ) {
        return Ok(CodeLayout {
            instruction_start: start,
            start_is_pointer,
            instruction_size: size,
            flags,
            kind_mask,
            kind_shift,
            kind_baseline,
            bytecode,
            // Instructions follow the Code header itself.
            header_size: start,
            instruction_stream: 0,
            deopt_sfi_index,
        });
    }
    // V8 11 lost Code's constants; the layout from `source_position_table` on is
    // instruction_stream, code_entry_point, flags (u32), builtin_id (u16) and
    // kind_specific_flags (u16, merged into flags in 11.4.59), instruction_size (i32).
    let positions = get("class_Code__source_position_table__ByteArray")
        .ok_or(Refusal::Missing("class_Code__source_position_table__ByteArray"))?;
    if !start_is_pointer {
        return Err(Refusal::Missing("class_Code__instruction_start__uintptr_t"));
    }
    let flags = positions + 24;
    let instruction_size = if version < (11, 4, 59) { flags + 8 } else { flags + 4 };
    Ok(CodeLayout {
        instruction_start: positions + 16,
        start_is_pointer,
        instruction_size,
        flags,
        kind_mask,
        kind_shift,
        kind_baseline,
        bytecode,
        // InstructionStream: map, code, then the instructions.
        header_size: get("class_InstructionStream__instruction_start__uintptr_t").unwrap_or(16),
        instruction_stream: positions + 8,
        deopt_sfi_index,
    })
}

/// `ScopeFlags` bits (`scope-info.tq`), checked against live node 18 and node 20 heaps.
fn scope_info_layout(c: &HashMap<String, i64>, version: (u32, u32, u32)) -> Result<ScopeInfoLayout, Refusal> {
    let get = |name: &'static str| c.get(name).map(|&v| v as u64).ok_or(Refusal::Missing(name));
    Ok(ScopeInfoLayout {
        idx_context_local_count: get("scopeinfo_idx_ncontextlocals")?,
        idx_first_vars: get("scopeinfo_idx_first_vars")?,
        // kScopeInfoMaxInlinedLocalNamesSize; names were always inline before V8 10.x.
        max_inlined_locals: 75,
        flag_scope_type: (0, 4),
        flag_saved_class_variable: 10,
        flag_function_variable: (12, 2),
        flag_inferred_name: 14,
        flag_receiver: (version < (10, 0, 0)).then_some((7, 2)),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn metadata(text: &str, version: (u32, u32, u32)) -> ElfMetadata {
        let constants = text
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(' ')?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect();
        ElfMetadata { constants, version: Some(version), builtins: None }
    }

    #[test]
    fn node20_layout() {
        let meta = metadata(include_str!("testdata/v8dbg-node20.txt"), (11, 3, 244));
        let layout = Layout::new(&meta).expect("node 20 is supported");
        assert_eq!((layout.fp_context, layout.fp_function), (-8, -16));
        assert_eq!((layout.fp_bytecode_array, layout.fp_bytecode_offset), (-32, -40));
        // JS_FUNCTION_TYPE 2066, class constructors 2081 (seen in a live heap), then
        // JS_ATOMICS_CONDITION_TYPE 2097.
        assert_eq!(layout.js_function_types, 2066..2097);
        assert!(layout.is_js_function(2081));
        assert_eq!(layout.js_function_code, 48);
        assert_eq!(layout.bytecode_array_data, 54);
        assert_eq!(layout.bytecode_array_positions, 32);
        let code = layout.code;
        assert_eq!((code.instruction_start, code.flags, code.instruction_size), (40, 48, 56));
        assert!(code.start_is_pointer);
        // Seen in a live heap: InstructionStream {map, code}, instructions 16 bytes in.
        assert_eq!((code.instruction_stream, code.header_size, code.deopt_sfi_index), (32, 16, 6));
        assert_eq!(code.kind_baseline, 11);
        assert_eq!(layout.scope_info.idx_first_vars, 3);
        assert_eq!(layout.scope_info.flag_receiver, None);
    }

    #[test]
    fn node18_layout() {
        let meta = metadata(include_str!("testdata/v8dbg-node18.txt"), (10, 2, 154));
        let layout = Layout::new(&meta).expect("node 18 is supported");
        assert_eq!(layout.js_function_code, 48);
        assert_eq!(layout.bytecode_array_data, 56);
        let code = layout.code;
        assert_eq!((code.instruction_start, code.flags, code.instruction_size), (128, 48, 40));
        assert!(!code.start_is_pointer, "V8 10 keeps instructions inline after the Code header");
        assert_eq!(code.header_size, 128);
    }

    #[test]
    fn refuses_unknown_layouts() {
        let text = include_str!("testdata/v8dbg-node20.txt");
        assert_eq!(
            Layout::new(&metadata(text, (12, 4, 254))).err(),
            Some(Refusal::UnknownVersion(12, 4, 254)),
            "node 22's V8 moved fields memtrace reads"
        );
        let compressed = text.replace("TaggedSize 8", "TaggedSize 4");
        assert_eq!(
            Layout::new(&metadata(&compressed, (11, 3, 244))).err(),
            Some(Refusal::PointerCompression(4))
        );
        let no_version = ElfMetadata { version: None, ..metadata(text, (0, 0, 0)) };
        assert_eq!(Layout::new(&no_version).err(), Some(Refusal::NoVersion));
        let lost = text.replace("class_JSFunction__shared__SharedFunctionInfo", "x");
        assert_eq!(
            Layout::new(&metadata(&lost, (11, 3, 244))).err(),
            Some(Refusal::Missing("class_JSFunction__shared__SharedFunctionInfo"))
        );
    }
}
