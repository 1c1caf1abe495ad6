//! The JSON report (`--json`), the contract of DESIGN.md, version 1.

use std::io::Write;

use super::ExportError;
use crate::report::Report;

/// Writes the report as pretty-printed JSON followed by a newline.
pub fn write_json<W: Write>(report: &Report, mut out: W) -> Result<(), ExportError> {
    serde_json::to_writer_pretty(&mut out, report)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::export::fixture::sample_report;

    fn render(report: &Report) -> Vec<u8> {
        let mut out = Vec::new();
        write_json(report, &mut out).expect("write JSON");
        out
    }

    fn keys(value: &Value) -> Vec<&str> {
        let mut keys: Vec<&str> =
            value.as_object().expect("a JSON object").keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    /// Every key of the contract is there with its name; fields may be added.
    fn assert_contract(actual: &[&str], contract: &[&str]) {
        for key in contract {
            assert!(actual.contains(key), "missing contract key {key:?} in {actual:?}");
        }
    }

    fn sorted(mut keys: Vec<&str>) -> Vec<&str> {
        keys.sort_unstable();
        keys
    }

    #[test]
    fn round_trips() {
        let report = sample_report();
        let back: Report = serde_json::from_slice(&render(&report)).expect("parse our own JSON");
        assert_eq!(back, report);
    }

    #[test]
    fn keys_of_the_contract_are_all_there() {
        let json: Value = serde_json::from_slice(&render(&sample_report())).expect("valid JSON");
        assert_contract(
            &keys(&json),
            &sorted(vec![
                "version",
                "target",
                "duration_s",
                "tracked",
                "totals",
                "leaks",
                "oom_kills",
                "timeline",
                "lost_events",
            ]),
        );
        assert_eq!(json["version"], crate::report::REPORT_VERSION);
        for key in ["other_suspects", "segments"] {
            assert!(json[key].is_array(), "{key} is a list");
        }
        assert_contract(
            &keys(&json["target"]),
            &sorted(vec!["pid", "comm", "cmdline", "exited", "oom_killed"]),
        );
        assert_contract(
            &keys(&json["totals"]),
            &sorted(vec!["outstanding_bytes", "allocated_bytes", "freed_bytes", "resident_bytes"]),
        );
        let leak = &json["leaks"][0];
        assert_contract(
            &keys(leak),
            &sorted(vec![
                "bytes",
                "count",
                "oldest_age_s",
                "growth_bytes_per_s",
                "score",
                "sources",
                "frames",
                "verdict",
                "reason",
                "culprit",
                "view",
                "evidence",
                "variants",
            ]),
        );
        assert_eq!(leak["culprit"]["function"], "rememberOrder");
        assert_eq!(leak["view"], "mmap");
        assert_eq!(leak["sources"], serde_json::json!(["mmap", "faults"]));
        assert_eq!(leak["verdict"], "leak");
        assert_contract(
            &keys(&leak["frames"][0]),
            &sorted(vec!["function", "module", "file", "line", "kind"]),
        );
        assert_eq!(leak["frames"][0]["kind"], "js");
        assert_eq!(json["other_suspects"][0]["frames"][0]["kind"], "kernel");
        assert_eq!(json["segments"][0]["kind"], "malloc-arena");
        assert_eq!(json["segments"][0]["extended_by"][0]["verdict"], "unattributed");
        assert_contract(
            &keys(&json["oom_kills"][0]),
            &sorted(vec![
                "pid",
                "comm",
                "anon_rss_bytes",
                "file_rss_bytes",
                "shmem_rss_bytes",
                "total_vm_bytes",
                "oom_score_adj",
                "cgroup",
                "memcg_limit_bytes",
            ]),
        );
        assert_contract(
            &keys(&json["timeline"][0]),
            &sorted(vec![
                "t_s",
                "rss_bytes",
                "outstanding_bytes",
                "rss_anon_bytes",
                "rss_file_bytes",
                "rss_shmem_bytes",
                "resident_bytes",
            ]),
        );
    }
}
