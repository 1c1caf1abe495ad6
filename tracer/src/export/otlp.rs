//! OTLP profiles (`--otlp-profiles URL`): the report as an `ExportProfilesServiceRequest`
//! of the `v1development` signal (alpha upstream). One profile per view present, its
//! sample type that view's `<view>_space` in bytes (as in the pprof export; OTLP allows
//! one sample type per profile, so no profile adds two views together); one sample per
//! stack variant, with the suspect's culprit and verdict as attributes.

pub mod proto;

use std::collections::HashMap;

use prost::Message as _;

use crate::export::pprof::view_sample_type;
use crate::report::{Frame, FrameKind, Report};

/// Who sent the profiles: the resource's attributes besides the process's own.
#[derive(Clone, Debug, Default)]
pub struct Resource {
    /// `service.name`.
    pub service: String,
    /// More resource attributes (`--label key=value`).
    pub attributes: Vec<(String, String)>,
}

/// The encoded request for `report`, covering `from_unix_s..until_unix_s`.
#[must_use]
pub fn encode(report: &Report, resource: &Resource, from_unix_s: u64, until_unix_s: u64) -> Vec<u8> {
    request(report, resource, from_unix_s, until_unix_s).encode_to_vec()
}

/// Builds the request message.
#[must_use]
pub fn request(
    report: &Report,
    resource: &Resource,
    from_unix_s: u64,
    until_unix_s: u64,
) -> proto::ExportProfilesServiceRequest {
    let mut dict = Dictionary::new();
    let time_unix_nano = from_unix_s.saturating_mul(1_000_000_000);
    let duration_nano = until_unix_s.saturating_sub(from_unix_s).saturating_mul(1_000_000_000);
    let mut profiles = Vec::new();
    for view in report.views_present() {
        let sample_type = proto::ValueType {
            type_strindex: dict.string(&view_sample_type(view)),
            unit_strindex: dict.string("bytes"),
        };
        let mut samples = Vec::new();
        for leak in report.all_suspects() {
            let culprit = leak.culprit.label();
            for variant in leak.variants_or_self().iter().filter(|v| v.source == Some(view) && v.bytes > 0) {
                let mut attribute_indices = vec![dict.attribute("memtrace.verdict", leak.verdict.name())];
                if !leak.culprit.function.is_empty() {
                    attribute_indices.push(dict.attribute("memtrace.culprit", &culprit));
                }
                samples.push(proto::Sample {
                    stack_index: dict.stack(&variant.frames),
                    attribute_indices,
                    values: vec![i64::try_from(variant.bytes).unwrap_or(i64::MAX)],
                });
            }
        }
        profiles.push(proto::Profile {
            sample_type: Some(sample_type),
            samples,
            time_unix_nano,
            duration_nano,
            profile_id: profile_id(report, view_sample_type(view).as_bytes(), from_unix_s),
            attribute_indices: Vec::new(),
        });
    }
    let target = &report.target;
    let mut attributes = vec![
        string_attribute("service.name", &resource.service),
        proto::KeyValue {
            key: "process.pid".into(),
            value: Some(proto::AnyValue { value: Some(proto::Value::Int(i64::from(target.pid))) }),
        },
        string_attribute("process.executable.name", &target.comm),
    ];
    if !target.cmdline.is_empty() {
        attributes.push(string_attribute("process.command_line", &target.cmdline));
    }
    attributes.extend(resource.attributes.iter().map(|(k, v)| string_attribute(k, v)));
    proto::ExportProfilesServiceRequest {
        resource_profiles: vec![proto::ResourceProfiles {
            resource: Some(proto::Resource { attributes }),
            scope_profiles: vec![proto::ScopeProfiles {
                scope: Some(proto::InstrumentationScope {
                    name: "memtrace".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                profiles,
            }],
        }],
        dictionary: Some(dict.finish()),
    }
}

fn string_attribute(key: &str, value: &str) -> proto::KeyValue {
    proto::KeyValue {
        key: key.to_string(),
        value: Some(proto::AnyValue { value: Some(proto::Value::String(value.to_string())) }),
    }
}

/// 16 bytes, not all zero (which the spec calls invalid), distinct per target, sample type
/// and push.
fn profile_id(report: &Report, sample_type: &[u8], from_unix_s: u64) -> Vec<u8> {
    use std::hash::{DefaultHasher, Hash as _, Hasher as _};
    let mut id = Vec::with_capacity(16);
    for salt in [0u8, 1] {
        let mut h = DefaultHasher::new();
        (salt, report.target.pid, sample_type, from_unix_s).hash(&mut h);
        id.extend_from_slice(&(h.finish() | 1).to_le_bytes());
    }
    id
}

/// `profile.frame.type` values of the OpenTelemetry profiling conventions.
fn frame_type(kind: FrameKind) -> &'static str {
    match kind {
        FrameKind::Native => "native",
        FrameKind::Js => "v8js",
        FrameKind::Kernel => "kernel",
        FrameKind::Unknown => "unknown",
    }
}

/// The shared tables, each with its zero value at index 0 and entries interned by value.
struct Dictionary {
    strings: Vec<String>,
    string_ids: HashMap<String, i32>,
    attributes: Vec<proto::KeyValueAndUnit>,
    attribute_ids: HashMap<(String, String), i32>,
    functions: Vec<proto::Function>,
    function_ids: HashMap<(String, String), i32>,
    mappings: Vec<proto::Mapping>,
    mapping_ids: HashMap<String, i32>,
    locations: Vec<proto::Location>,
    location_ids: HashMap<Frame, i32>,
    stacks: Vec<proto::Stack>,
    stack_ids: HashMap<Vec<i32>, i32>,
}

fn index(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

impl Dictionary {
    fn new() -> Self {
        Self {
            strings: vec![String::new()],
            string_ids: HashMap::from([(String::new(), 0)]),
            attributes: vec![proto::KeyValueAndUnit::default()],
            attribute_ids: HashMap::new(),
            functions: vec![proto::Function::default()],
            function_ids: HashMap::new(),
            mappings: vec![proto::Mapping::default()],
            mapping_ids: HashMap::new(),
            locations: vec![proto::Location::default()],
            location_ids: HashMap::new(),
            stacks: vec![proto::Stack::default()],
            stack_ids: HashMap::from([(Vec::new(), 0)]),
        }
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = index(self.strings.len());
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    fn attribute(&mut self, key: &str, value: &str) -> i32 {
        let k = (key.to_string(), value.to_string());
        if let Some(&id) = self.attribute_ids.get(&k) {
            return id;
        }
        let id = index(self.attributes.len());
        let key_strindex = self.string(key);
        self.attributes.push(proto::KeyValueAndUnit {
            key_strindex,
            value: Some(proto::AnyValue { value: Some(proto::Value::String(value.to_string())) }),
            unit_strindex: 0,
        });
        self.attribute_ids.insert(k, id);
        id
    }

    fn function(&mut self, frame: &Frame) -> i32 {
        let k = (frame.function.clone(), frame.file.clone());
        if let Some(&id) = self.function_ids.get(&k) {
            return id;
        }
        let id = index(self.functions.len());
        let name_strindex = self.string(&frame.function);
        let filename_strindex = self.string(&frame.file);
        self.functions.push(proto::Function {
            name_strindex,
            system_name_strindex: name_strindex,
            filename_strindex,
        });
        self.function_ids.insert(k, id);
        id
    }

    /// 0 (none) for frames without a module, e.g. JIT code.
    fn mapping(&mut self, module: &str) -> i32 {
        if module.is_empty() {
            return 0;
        }
        if let Some(&id) = self.mapping_ids.get(module) {
            return id;
        }
        let id = index(self.mappings.len());
        let filename_strindex = self.string(module);
        self.mappings.push(proto::Mapping { filename_strindex });
        self.mapping_ids.insert(module.to_string(), id);
        id
    }

    fn location(&mut self, frame: &Frame) -> i32 {
        if let Some(&id) = self.location_ids.get(frame) {
            return id;
        }
        let id = index(self.locations.len());
        let mapping_index = self.mapping(&frame.module);
        let function_index = self.function(frame);
        let kind = self.attribute("profile.frame.type", frame_type(frame.kind));
        self.locations.push(proto::Location {
            mapping_index,
            lines: vec![proto::Line { function_index, line: i64::from(frame.line) }],
            attribute_indices: vec![kind],
        });
        self.location_ids.insert(frame.clone(), id);
        id
    }

    /// Frames leaf first, as OTLP stacks are.
    fn stack(&mut self, frames: &[Frame]) -> i32 {
        let location_indices: Vec<i32> = frames.iter().map(|f| self.location(f)).collect();
        if let Some(&id) = self.stack_ids.get(&location_indices) {
            return id;
        }
        let id = index(self.stacks.len());
        self.stacks.push(proto::Stack { location_indices: location_indices.clone() });
        self.stack_ids.insert(location_indices, id);
        id
    }

    fn finish(self) -> proto::ProfilesDictionary {
        proto::ProfilesDictionary {
            mapping_table: self.mappings,
            location_table: self.locations,
            function_table: self.functions,
            link_table: vec![proto::Link::default()],
            string_table: self.strings,
            attribute_table: self.attributes,
            stack_table: self.stacks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(d: &proto::ProfilesDictionary, i: i32) -> &str {
        &d.string_table[usize::try_from(i).expect("index")]
    }

    #[test]
    fn one_profile_per_view_with_the_leaking_stack() {
        let report = crate::export::fixture::sample_report();
        let resource = Resource { service: "orders".into(), attributes: vec![("env".into(), "prod".into())] };
        let bytes = encode(&report, &resource, 1_700_000_000, 1_700_000_010);
        let req = proto::ExportProfilesServiceRequest::decode(bytes.as_slice()).expect("decodes");
        let d = req.dictionary.expect("dictionary");
        for (name, zero) in [
            ("string", d.string_table[0].is_empty()),
            ("stack", d.stack_table[0] == proto::Stack::default()),
            ("location", d.location_table[0] == proto::Location::default()),
            ("function", d.function_table[0] == proto::Function::default()),
            ("mapping", d.mapping_table[0] == proto::Mapping::default()),
            ("attribute", d.attribute_table[0] == proto::KeyValueAndUnit::default()),
        ] {
            assert!(zero, "{name}_table[0] is the zero value");
        }
        let rp = &req.resource_profiles[0];
        let attrs = &rp.resource.as_ref().expect("resource").attributes;
        assert!(attrs.iter().any(|kv| kv.key == "service.name"
            && kv.value == Some(proto::AnyValue { value: Some(proto::Value::String("orders".into())) })));
        assert!(attrs.iter().any(|kv| kv.key == "env"));
        let profiles = &rp.scope_profiles[0].profiles;
        let types: Vec<&str> = profiles
            .iter()
            .map(|p| resolve(&d, p.sample_type.as_ref().expect("sample type").type_strindex))
            .collect();
        let expected: Vec<String> = report.views_present().into_iter().map(view_sample_type).collect();
        assert_eq!(types, expected);
        assert!(profiles.iter().all(|p| p.duration_nano == 10_000_000_000 && p.profile_id.len() == 16));
        // The top leak's bytes sit on a stack whose leaf is its first frame.
        let top = &report.leaks[0];
        let variant = &top.variants_or_self()[0];
        let view = variant.source.expect("source");
        let profile = &profiles[report.views_present().iter().position(|v| *v == view).expect("view")];
        let found = profile.samples.iter().any(|s| {
            let stack = &d.stack_table[usize::try_from(s.stack_index).expect("index")];
            let leaf = &d.location_table[usize::try_from(stack.location_indices[0]).expect("index")];
            let function = &d.function_table[usize::try_from(leaf.lines[0].function_index).expect("index")];
            resolve(&d, function.name_strindex) == variant.frames[0].function
                && s.values == [i64::try_from(variant.bytes).expect("fits")]
        });
        assert!(found, "{profile:?}");
    }
}
