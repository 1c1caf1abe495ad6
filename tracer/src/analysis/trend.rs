//! Growth over the run: per-stack history of held bytes at each snapshot, and the
//! verdict that separates a leak from a warm-up (cache) and from churn.
//!
//! For a stack's series of held bytes `v[0..=n]` at snapshot times `t[0..=n]`:
//! - `slope`: least-squares slope of `v` over `t` (bytes/s);
//! - `late_growth`: share of the intervals in the second half of the run in which `v`
//!   grew;
//! - `retention`: net growth over gross growth, `(v[n] - v[0]) / Σ max(v[i+1] - v[i], 0)`:
//!   the share of what the stack took that it still holds.
//!
//! `score = max(slope, 0) [MiB/min] × late_growth × retention`. A leak keeps growing to
//! the end (high `late_growth`) and keeps what it took (`retention` ≈ 1); a cache that
//! warmed up stopped growing (`late_growth` ≈ 0); churn gives memory back
//! (`retention` < 1, slope ≈ 0).

use std::collections::HashMap;

pub use crate::report::Verdict;
use crate::{
    model::{ProcIndex, Source, StackAgg, StackId},
    units::human_bytes,
};

/// A series is the held bytes of one stack in one view of one process.
pub type SeriesKey = (ProcIndex, StackId, Source);

#[must_use]
pub fn series_key(agg: &StackAgg) -> SeriesKey {
    (agg.proc, agg.stack, agg.source)
}

/// Held bytes per stack at each snapshot, bounded in points and series.
#[derive(Debug)]
pub struct History {
    times: Vec<f64>,
    series: HashMap<SeriesKey, Vec<u64>>,
    max_points: usize,
    max_series: usize,
    dropped_series: u64,
    /// Views read less often than snapshots are taken (the JS heap view): the time of
    /// each one's last reading. Between readings its series repeat the last value; a new
    /// reading replaces those repeats by the line between the two readings.
    observed: HashMap<Source, f64>,
}

impl History {
    #[must_use]
    pub fn new(max_points: usize, max_series: usize) -> Self {
        Self {
            times: Vec::new(),
            series: HashMap::new(),
            max_points: max_points.max(4),
            max_series,
            dropped_series: 0,
            observed: HashMap::new(),
        }
    }

    /// Says that the last snapshot's values of `source` are a fresh reading (see
    /// `observed`): the points since its previous reading are interpolated. Without it a
    /// steady leak read every 30 s and snapshotted every 3 s would look like a staircase,
    /// flat in nine intervals of ten, and be judged a warm-up.
    pub fn observed(&mut self, source: Source) {
        let Some(&now) = self.times.last() else { return };
        let n = self.times.len() - 1;
        if let Some(since) = self.observed.insert(source, now) {
            // The last point at or before the previous reading (points may have been
            // thinned since).
            let Some(k) = self.times.iter().rposition(|&t| t <= since) else { return };
            let span = now - self.times[k];
            if k + 1 >= n || span <= 0.0 {
                return;
            }
            for (key, values) in &mut self.series {
                if key.2 != source || values.len() != self.times.len() {
                    continue;
                }
                let (from, to) = (values[k] as f64, values[n] as f64);
                let t0 = self.times[k];
                for (v, &t) in values[k + 1..n].iter_mut().zip(&self.times[k + 1..n]) {
                    *v = (from + (to - from) * (t - t0) / span).round() as u64;
                }
            }
        }
    }

    /// Adds a snapshot at `t_s`.
    pub fn record(&mut self, t_s: f64, aggs: &[StackAgg]) {
        let n = self.times.len();
        self.times.push(t_s);
        for values in self.series.values_mut() {
            values.push(0);
        }
        for agg in aggs {
            let key = series_key(agg);
            if let Some(values) = self.series.get_mut(&key) {
                if let Some(last) = values.last_mut() {
                    *last = agg.bytes;
                }
            } else if self.series.len() < self.max_series {
                let mut values = vec![0; n];
                values.push(agg.bytes);
                self.series.insert(key, values);
            } else {
                self.dropped_series += 1;
            }
        }
        if self.times.len() > self.max_points {
            // Halve the resolution, keep the whole run: drop every other point but the last.
            let keep = |i: usize, len: usize| i % 2 == 1 || i == len - 1;
            let len = self.times.len();
            self.times =
                self.times.iter().enumerate().filter(|(i, _)| keep(*i, len)).map(|(_, t)| *t).collect();
            for values in self.series.values_mut() {
                *values = values.iter().enumerate().filter(|(i, _)| keep(*i, len)).map(|(_, v)| *v).collect();
            }
        }
    }

    #[must_use]
    pub fn times(&self) -> &[f64] {
        &self.times
    }

    #[must_use]
    pub fn series(&self, key: SeriesKey) -> Option<&[u64]> {
        self.series.get(&key).map(Vec::as_slice)
    }

    /// Series that found the history full (their trend is judged on the final value).
    #[must_use]
    pub fn dropped_series(&self) -> u64 {
        self.dropped_series
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Trend {
    pub slope_bytes_per_s: f64,
    pub late_growth: f64,
    pub retention: f64,
    pub score: f64,
    pub verdict: Verdict,
    pub reason: String,
}

const MIB: f64 = 1024.0 * 1024.0;

/// Judges one series (times in seconds, held bytes).
#[must_use]
pub fn assess(times: &[f64], values: &[u64]) -> Trend {
    let n = times.len().min(values.len());
    let last = values.get(n.wrapping_sub(1)).copied().unwrap_or(0);
    if n < 3 {
        return Trend {
            slope_bytes_per_s: 0.0,
            late_growth: 0.0,
            retention: 1.0,
            score: 0.0,
            verdict: Verdict::Unknown,
            reason: format!(
                "holds {}; {n} snapshot(s) are too few to judge growth (use a longer run or a shorter --interval)",
                human_bytes(last)
            ),
        };
    }
    let (t, v) = (&times[..n], &values[..n]);
    let mean_t = t.iter().sum::<f64>() / n as f64;
    let mean_v = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let (mut cov, mut var) = (0.0, 0.0);
    for i in 0..n {
        cov += (t[i] - mean_t) * (v[i] as f64 - mean_v);
        var += (t[i] - mean_t) * (t[i] - mean_t);
    }
    let slope = if var > 0.0 { cov / var } else { 0.0 };
    let intervals = n - 1;
    let grew = |i: usize| v[i + 1] > v[i];
    let grew_all = (0..intervals).filter(|&i| grew(i)).count();
    let late_start = intervals / 2;
    let late_total = intervals - late_start;
    let late_grew = (late_start..intervals).filter(|&i| grew(i)).count();
    let late_growth = late_grew as f64 / late_total as f64;
    let peak = v.iter().copied().max().unwrap_or(0);
    let gross: u64 = (0..intervals).map(|i| v[i + 1].saturating_sub(v[i])).sum();
    let net = last.saturating_sub(v[0]);
    let retention = if gross == 0 { 0.0 } else { (net as f64 / gross as f64).min(1.0) };
    let rate_per_min = slope.max(0.0) * 60.0 / MIB;
    let score = rate_per_min * late_growth * retention;
    let span = t[n - 1] - t[0];
    let (verdict, reason) = if peak == 0 {
        (Verdict::Churn, "held nothing at any snapshot (transient)".to_string())
    } else if gross == 0 {
        (Verdict::WarmUp, format!("holds {} since before the first snapshot, no growth", human_bytes(last)))
    } else if retention < 0.5 || slope <= 0.0 {
        (
            Verdict::Churn,
            format!(
                "took {} in all but holds {} now (peak {}): memory is given back (churn)",
                human_bytes(gross),
                human_bytes(last),
                human_bytes(peak)
            ),
        )
    } else if late_growth >= 0.5 {
        (
            Verdict::Leak,
            format!(
                "grew {}/min in {grew_all} of {intervals} intervals over {span:.0}s and was still growing at the end",
                human_bytes((slope * 60.0) as u64)
            ),
        )
    } else if late_growth < 0.25 {
        let flat_since = (0..intervals).rev().find(|&i| grew(i)).map_or(t[0], |i| t[i + 1]);
        (
            Verdict::WarmUp,
            format!(
                "grew to {} by {:.0}s, then flat for {:.0}s (warm-up or cache)",
                human_bytes(peak),
                flat_since - t[0],
                t[n - 1] - flat_since
            ),
        )
    } else {
        (
            Verdict::Leak,
            format!(
                "grew {}/min, intermittently ({grew_all} of {intervals} intervals, {late_grew} of the last {late_total})",
                human_bytes((slope * 60.0) as u64)
            ),
        )
    };
    Trend { slope_bytes_per_s: slope, late_growth, retention, score, verdict, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(n: usize) -> Vec<f64> {
        (0..n).map(|i| i as f64 * 10.0).collect()
    }

    #[test]
    fn linear_growth_is_a_leak() {
        let v: Vec<u64> = (0..30).map(|i| i * (1 << 20)).collect();
        let trend = assess(&times(30), &v);
        assert_eq!(trend.verdict, Verdict::Leak, "{trend:?}");
        assert!((trend.slope_bytes_per_s - f64::from(1 << 20) / 10.0).abs() < 1.0);
        assert!((trend.score - 6.0).abs() < 1e-6, "1 MiB per 10 s = 6 MiB/min: {}", trend.score);
        assert!(trend.reason.contains("29 of 29 intervals"), "{}", trend.reason);
    }

    #[test]
    fn step_then_flat_is_a_warm_up() {
        let v: Vec<u64> = (0..30).map(|i| if i < 5 { i * (8 << 20) } else { 32 << 20 }).collect();
        let trend = assess(&times(30), &v);
        assert_eq!(trend.verdict, Verdict::WarmUp, "{trend:?}");
        assert!(trend.score.abs() < 1e-9, "no growth in the second half: {}", trend.score);
        assert!(trend.reason.contains("then flat"), "{}", trend.reason);
    }

    #[test]
    fn sawtooth_is_churn() {
        let v: Vec<u64> = (0..30).map(|i| (i % 5) * (4 << 20)).collect();
        let trend = assess(&times(30), &v);
        assert_eq!(trend.verdict, Verdict::Churn, "{trend:?}");
        let linear: Vec<u64> = (0..30).map(|i| i * (1 << 20)).collect();
        assert!(trend.score < assess(&times(30), &linear).score / 4.0);
    }

    #[test]
    fn slow_steady_leak_outranks_big_cache() {
        let leak: Vec<u64> = (0..20).map(|i| i * (256 << 10)).collect();
        let cache: Vec<u64> = (0..20).map(|i| if i == 0 { 0 } else { 200 << 20 }).collect();
        assert!(assess(&times(20), &leak).score > assess(&times(20), &cache).score);
    }

    #[test]
    fn too_few_points() {
        assert_eq!(assess(&[0.0, 1.0], &[0, 5]).verdict, Verdict::Unknown);
    }

    #[test]
    fn history_is_bounded_and_aligned() {
        let mut h = History::new(8, 2);
        let agg = |stack, bytes| StackAgg {
            stack: StackId(stack),
            bytes,
            count: 1,
            oldest_ts_ns: 0,
            source: Source::Mmap,
            proc: ProcIndex(0),
            mean_ts_ns: 0,
        };
        for i in 0..20u64 {
            let mut aggs = vec![agg(1, i * 10)];
            if i >= 10 {
                aggs.push(agg(2, 5));
                aggs.push(agg(3, 7));
            }
            h.record(i as f64, &aggs);
        }
        assert!(h.times().len() <= 8);
        assert_eq!(h.times().last(), Some(&19.0), "the newest point is kept");
        let s1 = h.series((ProcIndex(0), StackId(1), Source::Mmap)).expect("series 1");
        assert_eq!(s1.len(), h.times().len());
        assert_eq!(s1.last(), Some(&190));
        assert!(h.series((ProcIndex(0), StackId(3), Source::Mmap)).is_none());
        assert_eq!(h.dropped_series(), 10);
    }

    /// The JS heap view is read every 30 s and snapshotted every 3 s: a steady leak must
    /// still be a leak (not the staircase of its repeated readings, judged a warm-up),
    /// and the other views' series are left as they were.
    #[test]
    fn a_view_read_every_tenth_snapshot_is_judged_on_its_readings() {
        let mut h = History::new(512, 16);
        let agg = |source, bytes| StackAgg {
            stack: StackId(1),
            bytes,
            count: 1,
            oldest_ts_ns: 0,
            source,
            proc: ProcIndex(0),
            mean_ts_ns: 0,
        };
        let mib = 1u64 << 20;
        let mut read = 0;
        for i in 0..=40u64 {
            // A reading at the view's opening (nothing yet), then one every 10 snapshots
            // of what the leak holds then (1 MiB per snapshot interval).
            if i % 10 == 0 {
                read = i * mib;
            }
            let mmap_bytes = if i % 2 == 0 { 4 * mib } else { 0 };
            h.record(i as f64 * 3.0, &[agg(Source::JsHeap, read), agg(Source::Mmap, mmap_bytes)]);
            if i % 10 == 0 {
                h.observed(Source::JsHeap);
            }
        }
        let js = h.series((ProcIndex(0), StackId(1), Source::JsHeap)).expect("js-heap series");
        assert_eq!(js[15], 15 * mib, "interpolated between the readings at 10 and 20");
        assert_eq!(js[40], 40 * mib);
        let trend = assess(h.times(), js);
        assert_eq!(trend.verdict, Verdict::Leak, "{trend:?}");
        let mmap = h.series((ProcIndex(0), StackId(1), Source::Mmap)).expect("mmap series");
        assert_eq!((mmap[14], mmap[15]), (4 * mib, 0), "other views untouched");

        // Without the readings marked, the same series is the staircase.
        let mut stairs = History::new(512, 16);
        for i in 0..=40u64 {
            stairs.record(i as f64 * 3.0, &[agg(Source::JsHeap, i / 10 * 10 * mib)]);
        }
        let flat = stairs.series((ProcIndex(0), StackId(1), Source::JsHeap)).expect("series");
        assert_ne!(assess(stairs.times(), flat).verdict, Verdict::Leak, "the staircase this fixes");
    }
}
