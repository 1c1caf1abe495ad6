//! Gzipped pprof profile (`--pprof`), readable by `go tool pprof`, Pyroscope, Parca and
//! speedscope. One sample per stack variant of every suspect, with values
//! `[inuse_objects, inuse_space, <view>_space..., growth_rate]`: `inuse_*` count the
//! report's primary view only (the default sample type; the mapped view includes the
//! program break's growth, disjoint address ranges), and each view present has its
//! own `<view>_space` column (`mapped_space`, `touched_space`, `malloc_space`,
//! `js_heap_space`, `arena_space`), so no sample type adds two views together.

pub mod proto;

use std::collections::HashMap;
use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use prost::Message;

use super::ExportError;
use crate::report::{Frame, Leak, Report, Source, Variant};

/// The sample type of one view's bytes.
#[must_use]
pub fn view_sample_type(view: Source) -> String {
    format!("{}_space", view.view().replace('-', "_"))
}

/// Sample types in value order: (type, unit).
#[must_use]
pub fn sample_types(report: &Report) -> Vec<(String, &'static str)> {
    let mut types = vec![("inuse_objects".to_string(), "count"), ("inuse_space".to_string(), "bytes")];
    types.extend(report.views_present().into_iter().map(|v| (view_sample_type(v), "bytes")));
    types.push(("growth_rate".to_string(), "bytes_per_second"));
    types
}

/// Writes the profile as gzip-compressed protobuf, as pprof expects on disk.
pub fn write_pprof<W: Write>(report: &Report, out: W) -> Result<(), ExportError> {
    let mut gz = GzEncoder::new(out, Compression::default());
    gz.write_all(&profile(report).encode_to_vec())?;
    gz.finish()?.flush()?;
    Ok(())
}

/// Builds the (uncompressed) profile message for `report`.
#[must_use]
pub fn profile(report: &Report) -> proto::Profile {
    let mut builder = Builder::default();
    // string_table[0] must be "".
    builder.string("");
    let sample_type = sample_types(report).iter().map(|(ty, unit)| builder.value_type(ty, unit)).collect();
    let default_sample_type = builder.string("inuse_space");
    let primary = report.primary_view();
    let views = report.views_present();
    let mut samples = Vec::new();
    for leak in report.all_suspects() {
        let variants = leak.variants_or_self();
        // The suspect's growth goes on its largest stack in its own view, once.
        let growth_on = variants.iter().position(|v| v.source == leak.view).unwrap_or(0);
        for (i, variant) in variants.iter().enumerate() {
            let growth = if i == growth_on { leak.growth_bytes_per_s } else { 0.0 };
            samples.push(builder.sample(leak, variant, primary, &views, growth));
        }
    }
    let mut comments = comments(report);
    comments.push(format!("inuse_space/inuse_objects: the {} view", primary.view()));
    let comment: Vec<i64> = comments.iter().map(|c| builder.string(c)).collect();
    proto::Profile {
        sample_type,
        sample: samples,
        mapping: builder.mappings,
        location: builder.locations,
        function: builder.functions,
        string_table: builder.strings,
        duration_nanos: nanos(report.duration_s),
        comment,
        default_sample_type,
        ..proto::Profile::default()
    }
}

fn comments(report: &Report) -> Vec<String> {
    let target = &report.target;
    let mut comments = vec![format!("memtrace: {} (pid {})", target.comm, target.pid)];
    if !target.cmdline.is_empty() {
        comments.push(format!("command: {}", target.cmdline));
    }
    comments.push(format!("tracked: {}", report.tracked.join(",")));
    if report.lost_events > 0 {
        comments.push(format!("WARNING: {} events lost; values are lower bounds", report.lost_events));
    }
    comments
}

/// Seconds to nanoseconds, saturating; NaN and negatives become 0.
fn nanos(secs: f64) -> i64 {
    (secs * 1e9).round().max(0.0) as i64
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Interns strings, functions, locations and mappings; ids are 1-based in order of
/// first use, so the output is deterministic.
#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<proto::Function>,
    function_ids: HashMap<(String, String), u64>,
    locations: Vec<proto::Location>,
    location_ids: HashMap<Frame, u64>,
    mappings: Vec<proto::Mapping>,
    mapping_ids: HashMap<String, u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = signed(self.strings.len() as u64);
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    fn value_type(&mut self, ty: &str, unit: &str) -> proto::ValueType {
        proto::ValueType { r#type: self.string(ty), unit: self.string(unit) }
    }

    fn sample(
        &mut self,
        leak: &Leak,
        v: &Variant,
        primary: Source,
        views: &[Source],
        growth: f64,
    ) -> proto::Sample {
        let location_id = v.frames.iter().map(|frame| self.location(frame)).collect();
        let mut label = Vec::new();
        if let Some(source) = v.source {
            label.push(proto::Label {
                key: self.string("source"),
                str: self.string(source.name()),
                ..proto::Label::default()
            });
        }
        if !leak.culprit.function.is_empty() {
            let culprit = leak.culprit.label();
            label.push(proto::Label {
                key: self.string("culprit"),
                str: self.string(&culprit),
                ..proto::Label::default()
            });
        }
        label.push(proto::Label {
            key: self.string("verdict"),
            str: self.string(leak.verdict.name()),
            ..proto::Label::default()
        });
        label.push(proto::Label {
            key: self.string("oldest_age"),
            num: nanos(leak.oldest_age_s),
            num_unit: self.string("nanoseconds"),
            ..proto::Label::default()
        });
        let in_primary = v.source.is_some_and(|s| s.shown_in(primary));
        let mut value =
            vec![if in_primary { signed(v.count) } else { 0 }, if in_primary { signed(v.bytes) } else { 0 }];
        value.extend(views.iter().map(|view| if v.source == Some(*view) { signed(v.bytes) } else { 0 }));
        // `as` saturates; NaN becomes 0.
        value.push(growth.round() as i64);
        proto::Sample { location_id, value, label }
    }

    fn location(&mut self, frame: &Frame) -> u64 {
        if let Some(&id) = self.location_ids.get(frame) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        let mapping_id = self.mapping(frame);
        let function_id = self.function(frame);
        self.locations.push(proto::Location {
            id,
            mapping_id,
            line: vec![proto::Line { function_id, line: i64::from(frame.line), column: 0 }],
            ..proto::Location::default()
        });
        self.location_ids.insert(frame.clone(), id);
        id
    }

    /// 0 (no mapping) for frames without a module, e.g. JIT code.
    fn mapping(&mut self, frame: &Frame) -> u64 {
        if frame.module.is_empty() {
            return 0;
        }
        let id = if let Some(&id) = self.mapping_ids.get(&frame.module) {
            id
        } else {
            let id = self.mappings.len() as u64 + 1;
            let filename = self.string(&frame.module);
            self.mappings.push(proto::Mapping {
                id,
                filename,
                has_functions: true,
                ..proto::Mapping::default()
            });
            self.mapping_ids.insert(frame.module.clone(), id);
            id
        };
        if let Some(mapping) = id.checked_sub(1).and_then(|i| self.mappings.get_mut(i as usize)) {
            mapping.has_filenames |= !frame.file.is_empty();
            mapping.has_line_numbers |= frame.line > 0;
        }
        id
    }

    fn function(&mut self, frame: &Frame) -> u64 {
        let name = if frame.function.is_empty() { "[unknown]" } else { frame.function.as_str() };
        let key = (name.to_string(), frame.file.clone());
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let name = self.string(name);
        let filename = self.string(&frame.file);
        self.functions.push(proto::Function { id, name, system_name: name, filename, start_line: 0 });
        self.function_ids.insert(key, id);
        id
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use flate2::read::GzDecoder;

    use super::*;
    use crate::export::fixture::sample_report;

    fn decode(report: &Report) -> proto::Profile {
        let mut gz = Vec::new();
        write_pprof(report, &mut gz).expect("write pprof");
        let mut raw = Vec::new();
        GzDecoder::new(gz.as_slice()).read_to_end(&mut raw).expect("valid gzip");
        proto::Profile::decode(raw.as_slice()).expect("valid Profile protobuf")
    }

    fn string(profile: &proto::Profile, index: i64) -> &str {
        &profile.string_table[usize::try_from(index).expect("non-negative string index")]
    }

    #[test]
    fn decodes_with_totals_and_the_leaking_function() {
        let report = sample_report();
        let profile = decode(&report);
        assert_eq!(profile.string_table[0], "");
        let types: Vec<(&str, &str)> = profile
            .sample_type
            .iter()
            .map(|vt| (string(&profile, vt.r#type), string(&profile, vt.unit)))
            .collect();
        assert_eq!(
            types,
            [
                ("inuse_objects", "count"),
                ("inuse_space", "bytes"),
                ("mapped_space", "bytes"),
                ("arena_space", "bytes"),
                ("touched_space", "bytes"),
                ("growth_rate", "bytes_per_second")
            ]
        );
        assert_eq!(string(&profile, profile.default_sample_type), "inuse_space");
        assert_eq!(profile.duration_nanos, 30_000_000_000);

        // Each sample type's total is its view's total; inuse_* is the mapped view (with the
        // break's growth), never plus the touched pages of the same memory.
        let total = |i: usize| profile.sample.iter().map(|s| s.value[i]).sum::<i64>();
        let view = |s: Source| {
            i64::try_from(report.totals.views.iter().find(|v| v.source == Some(s)).expect("view").bytes)
                .expect("fits")
        };
        assert_eq!(total(1), i64::try_from(report.totals.outstanding_bytes).expect("fits"));
        assert_eq!(total(0), 305);
        assert_eq!(total(2), view(Source::Mmap));
        assert_eq!(total(3), view(Source::Brk));
        assert_eq!(total(4), view(Source::Faults));
        assert_eq!(total(5), 409_600 - 11);

        // The biggest sample's leaf names the leaking JS function and its file.
        let biggest = profile.sample.iter().max_by_key(|s| s.value[1]).expect("samples");
        let leaf = &profile.location[usize::try_from(biggest.location_id[0] - 1).expect("id")];
        let function = &profile.function[usize::try_from(leaf.line[0].function_id - 1).expect("id")];
        assert_eq!(string(&profile, function.name), "rememberOrder");
        assert_eq!(string(&profile, function.filename), "/srv/app.js");
        assert_eq!(leaf.line[0].line, 9);
        let labels: Vec<(&str, &str)> = biggest
            .label
            .iter()
            .filter(|l| l.str != 0)
            .map(|l| (string(&profile, l.key), string(&profile, l.str)))
            .collect();
        assert_eq!(labels, [("source", "mmap"), ("culprit", "rememberOrder app.js:9"), ("verdict", "leak")]);
    }

    #[test]
    fn ids_are_consistent_and_deduplicated() {
        let profile = decode(&sample_report());
        // 4 + 3 + 3 frames, with `main [node]` shared and the 4th leak a repeat.
        assert_eq!(profile.location.len(), 8);
        for (i, location) in profile.location.iter().enumerate() {
            assert_eq!(location.id, i as u64 + 1);
            assert!(location.mapping_id as usize <= profile.mapping.len());
            for line in &location.line {
                assert!((1..=profile.function.len() as u64).contains(&line.function_id));
            }
        }
        for sample in &profile.sample {
            assert_eq!(sample.value.len(), profile.sample_type.len());
            for id in &sample.location_id {
                assert!((1..=profile.location.len() as u64).contains(id));
            }
        }
        let mappings: Vec<&str> = profile.mapping.iter().map(|m| string(&profile, m.filename)).collect();
        assert_eq!(mappings, ["/usr/bin/node", "/lib/x86_64-linux-gnu/libc.so.6"]);
        assert!(profile.mapping[0].has_line_numbers, "heap.cc:120 is in node");
        assert!(!profile.mapping[1].has_filenames);
        let mut names: Vec<&str> = profile.function.iter().map(|f| string(&profile, f.name)).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), profile.function.len(), "one Function per (name, file)");
    }

    #[test]
    fn empty_report_is_a_valid_profile() {
        let profile = decode(&Report::default());
        assert!(profile.sample.is_empty());
        assert_eq!(profile.sample_type.len(), 3, "inuse_objects, inuse_space, growth_rate");
    }
}
