//! speedscope's file format (`--speedscope`), see
//! <https://www.speedscope.app/file-format-schema.json>: shared frames and two sampled
//! profiles, outstanding bytes (shown first) and outstanding allocations.

use std::collections::HashMap;
use std::io::Write;

use serde::Serialize;

use super::ExportError;
use super::stacks::{FlameValue, weighted_stacks};
use crate::report::{Frame, Report};

pub const SCHEMA: &str = "https://www.speedscope.app/file-format-schema.json";

#[derive(Serialize)]
struct File<'a> {
    #[serde(rename = "$schema")]
    schema: &'static str,
    shared: Shared<'a>,
    profiles: Vec<SampledProfile>,
    name: String,
    #[serde(rename = "activeProfileIndex")]
    active_profile_index: usize,
    exporter: String,
}

#[derive(Serialize)]
struct Shared<'a> {
    frames: Vec<SpeedscopeFrame<'a>>,
}

#[derive(Serialize)]
struct SpeedscopeFrame<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<u32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SampledProfile {
    r#type: &'static str,
    name: String,
    unit: &'static str,
    start_value: u64,
    end_value: u64,
    /// Root-first indices into `shared.frames`.
    samples: Vec<Vec<usize>>,
    weights: Vec<u64>,
}

/// Writes the speedscope JSON document for `report`.
pub fn write_speedscope<W: Write>(report: &Report, mut out: W) -> Result<(), ExportError> {
    serde_json::to_writer(&mut out, &document(report))?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn document(report: &Report) -> File<'_> {
    let target = &report.target;
    let who = if target.comm.is_empty() {
        format!("pid {}", target.pid)
    } else {
        format!("{} (pid {})", target.comm, target.pid)
    };
    let mut frames = Frames::default();
    let profiles = [
        (FlameValue::Outstanding, "outstanding bytes", "bytes"),
        (FlameValue::Count, "outstanding allocations", "none"),
    ]
    .into_iter()
    .map(|(value, what, unit)| {
        let (samples, weights): (Vec<_>, Vec<_>) = weighted_stacks(report, value)
            .into_iter()
            .map(|stack| {
                let indices = stack.frames.iter().map(|frame| frames.index(frame)).collect();
                (indices, stack.value)
            })
            .unzip();
        SampledProfile {
            r#type: "sampled",
            name: format!("{who}: {what}"),
            unit,
            start_value: 0,
            end_value: weights.iter().fold(0, |sum: u64, w| sum.saturating_add(*w)),
            samples,
            weights,
        }
    })
    .collect();
    File {
        schema: SCHEMA,
        shared: Shared { frames: frames.list },
        profiles,
        name: format!("memtrace: {who}"),
        active_profile_index: 0,
        exporter: format!("memtrace {}", env!("CARGO_PKG_VERSION")),
    }
}

/// Interns frames in order of first use.
#[derive(Default)]
struct Frames<'a> {
    list: Vec<SpeedscopeFrame<'a>>,
    ids: HashMap<&'a Frame, usize>,
}

impl<'a> Frames<'a> {
    fn index(&mut self, frame: &'a Frame) -> usize {
        if let Some(&id) = self.ids.get(frame) {
            return id;
        }
        let id = self.list.len();
        let name = if frame.function.is_empty() { "[unknown]" } else { frame.function.as_str() };
        // Without a source file, the module is the best "where" speedscope can show.
        let (file, line) = if frame.file.is_empty() {
            (Some(frame.module.as_str()).filter(|m| !m.is_empty()), None)
        } else {
            (Some(frame.file.as_str()), Some(frame.line).filter(|&l| l > 0))
        };
        self.list.push(SpeedscopeFrame { name, file, line });
        self.ids.insert(frame, id);
        id
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::export::fixture::sample_report;

    /// A trimmed copy of speedscope's published schema: the file, frame and sampled
    /// profile definitions (evented profiles are left out; memtrace never writes them).
    const MIN_SCHEMA: &str = include_str!("testdata/speedscope-schema.min.json");

    fn render(report: &Report) -> Value {
        let mut out = Vec::new();
        write_speedscope(report, &mut out).expect("write speedscope");
        serde_json::from_slice(&out).expect("speedscope output is JSON")
    }

    /// Checks `value` against the subset of JSON Schema the speedscope schema uses:
    /// `$ref`, `type`, `enum`, `required`, `properties`, `items`.
    fn validate(value: &Value, schema: &Value, root: &Value, path: &str) -> Result<(), String> {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let name = reference.strip_prefix("#/definitions/").ok_or("unsupported $ref")?;
            return validate(value, &root["definitions"][name], root, path);
        }
        if let Some(ty) = schema.get("type") {
            let allowed: Vec<&str> = match ty {
                Value::String(s) => vec![s.as_str()],
                Value::Array(types) => types.iter().filter_map(Value::as_str).collect(),
                _ => return Err(format!("bad schema type at {path}")),
            };
            let actual = match value {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            if !allowed.contains(&actual) {
                return Err(format!("{path}: expected {allowed:?}, found {actual}"));
            }
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array)
            && !options.contains(value)
        {
            return Err(format!("{path}: {value} is not one of {options:?}"));
        }
        for key in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let key = key.as_str().ok_or("bad required")?;
            if value.get(key).is_none() {
                return Err(format!("{path}: missing required key {key:?}"));
            }
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (key, property) in properties {
                if let Some(child) = value.get(key) {
                    validate(child, property, root, &format!("{path}.{key}"))?;
                }
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (i, item) in array.iter().enumerate() {
                validate(item, items, root, &format!("{path}[{i}]"))?;
            }
        }
        Ok(())
    }

    fn check_schema(doc: &Value) -> Result<(), String> {
        let schema: Value = serde_json::from_str(MIN_SCHEMA).expect("vendored schema is JSON");
        validate(doc, &schema, &schema, "$")
    }

    #[test]
    fn matches_the_schema_and_the_report() {
        let report = sample_report();
        let doc = render(&report);
        check_schema(&doc).expect("output satisfies the speedscope schema");
        assert_eq!(doc["$schema"], SCHEMA);

        let frames = doc["shared"]["frames"].as_array().expect("frames");
        let bytes = &doc["profiles"][0];
        assert_eq!(bytes["unit"], "bytes");
        let samples = bytes["samples"].as_array().expect("samples");
        let weights: Vec<u64> =
            bytes["weights"].as_array().expect("weights").iter().filter_map(Value::as_u64).collect();
        assert_eq!(samples.len(), weights.len());
        for sample in samples {
            for index in sample.as_array().expect("a sample is an index list") {
                let index = index.as_u64().expect("integer index");
                assert!(index < frames.len() as u64, "frame index {index} out of range");
            }
        }
        let total: u64 = weights.iter().sum();
        assert_eq!(total, report.totals.outstanding_bytes);
        assert_eq!(bytes["endValue"], total);

        // Root first: the first sample starts at main and ends at the leaking function.
        let first = samples[0].as_array().expect("sample");
        let frame = |v: &Value| &frames[usize::try_from(v.as_u64().expect("index")).expect("index")];
        assert_eq!(frame(&first[0])["name"], "main");
        let leaf = frame(first.last().expect("non-empty stack"));
        assert_eq!(leaf["name"], "rememberOrder");
        assert_eq!(leaf["file"], "/srv/app.js");
        assert_eq!(leaf["line"], 9);

        let counts = &doc["profiles"][1];
        let count_total: u64 =
            counts["weights"].as_array().expect("weights").iter().filter_map(Value::as_u64).sum();
        assert_eq!(count_total, 305);
    }

    #[test]
    fn empty_report_is_valid() {
        let doc = render(&Report::default());
        check_schema(&doc).expect("empty output satisfies the schema");
        assert_eq!(doc["profiles"][0]["samples"], Value::Array(Vec::new()));
    }

    #[test]
    fn the_check_rejects_broken_documents() {
        let mut doc = render(&sample_report());
        doc["profiles"][0].as_object_mut().expect("profile").remove("weights");
        assert!(check_schema(&doc).is_err());
        let mut doc = render(&sample_report());
        doc["profiles"][0]["unit"] = Value::from("parsecs");
        assert!(check_schema(&doc).is_err());
        let mut doc = render(&sample_report());
        doc["shared"]["frames"][0]["name"] = Value::from(3);
        assert!(check_schema(&doc).is_err());
    }
}
