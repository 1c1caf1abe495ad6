//! Time to the limit: at the rate the target's memory grew lately, when its memory
//! cgroup's limit is reached.
//!
//! The rate is the least-squares slope of the memory over the recent window of the
//! timeline. What is compared with the limit is what the kernel compares: the cgroup's
//! charged memory (`memory.usage_in_bytes` / `memory.current`, which counts every process
//! in the cgroup and its page cache), or the target's RSS when the cgroup cannot be read.
//! A slope counts as growth only when it is clear of the noise (a t-statistic of at
//! least [`MIN_T`]) and adds up to more than [`MIN_RISE_BYTES`] over the window: a service
//! whose RSS wobbles by a few pages is "not growing", not "reached in 40 years".

use crate::report::{LimitState, TimeToLimit, TimelinePoint};

/// The recent window the rate is fitted over.
pub const WINDOW_S: f64 = 300.0;
/// Fewer points than this in the window say nothing about a trend.
const MIN_POINTS: usize = 3;
/// Nor does a window shorter than this.
const MIN_SPAN_S: f64 = 2.0;
/// Growth over the window below this is page-level noise.
const MIN_RISE_BYTES: f64 = 256.0 * 1024.0;
/// Slope over its standard error: beyond 3 a flat, noisy series almost never goes.
const MIN_T: f64 = 3.0;

/// Fits the recent growth of `points` and says when the cgroup limit is reached at that
/// rate. `window_s` is how far back from the last point the fit looks.
#[must_use]
pub fn time_to_limit(points: &[TimelinePoint], window_s: f64) -> TimeToLimit {
    let Some(last) = points.last() else {
        return TimeToLimit { state: LimitState::Unknown, window_s, ..TimeToLimit::default() };
    };
    // The cgroup's usage is what the kernel holds against the limit; without it, RSS.
    let (basis, value): (&str, fn(&TimelinePoint) -> u64) = if last.memcg_usage_bytes > 0 {
        ("memcg", |p| p.memcg_usage_bytes)
    } else {
        ("rss", |p| p.rss_bytes)
    };
    let limit_bytes = last.memcg_limit_bytes;
    let usage_bytes = value(last);
    let recent: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.t_s >= last.t_s - window_s && value(p) > 0)
        .map(|p| (p.t_s, value(p) as f64))
        .collect();
    let fit = fit(&recent);
    let growth_bytes_per_s = fit.map_or(0.0, |f| f.slope);
    let mut out = TimeToLimit {
        state: LimitState::Unknown,
        basis: basis.to_string(),
        limit_bytes,
        usage_bytes,
        growth_bytes_per_s,
        seconds: None,
        window_s: fit.map_or(0.0, |f| f.span),
    };
    if limit_bytes > 0 && usage_bytes >= limit_bytes {
        out.state = LimitState::Reached;
        out.seconds = Some(0.0);
        return out;
    }
    let Some(fit) = fit else {
        if limit_bytes == 0 {
            out.state = LimitState::NoLimit;
        }
        return out;
    };
    let growing = fit.slope > 0.0 && fit.slope * fit.span >= MIN_RISE_BYTES && fit.t >= MIN_T;
    out.state = match (limit_bytes, growing) {
        (0, _) => LimitState::NoLimit,
        (_, false) => LimitState::NotGrowing,
        (limit, true) => {
            out.seconds = seconds_at_rate(limit.saturating_sub(usage_bytes), fit.slope);
            LimitState::Growing
        }
    };
    out
}

/// Seconds until `headroom_bytes` are used up at `bytes_per_s`, or `None` if that rate
/// never uses them up.
#[must_use]
pub fn seconds_at_rate(headroom_bytes: u64, bytes_per_s: f64) -> Option<f64> {
    (bytes_per_s > 0.0 && bytes_per_s.is_finite()).then(|| headroom_bytes as f64 / bytes_per_s)
}

#[derive(Clone, Copy, Debug)]
struct Fit {
    /// Bytes per second.
    slope: f64,
    /// The slope over its standard error (infinite for an exact line).
    t: f64,
    /// Seconds from the first to the last point.
    span: f64,
}

/// Ordinary least squares of value over time.
fn fit(points: &[(f64, f64)]) -> Option<Fit> {
    let (first, last) = (points.first()?, points.last()?);
    let span = last.0 - first.0;
    if points.len() < MIN_POINTS || span < MIN_SPAN_S {
        return None;
    }
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_v)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let residuals: f64 = points.iter().map(|p| (p.1 - mean_v - slope * (p.0 - mean_t)).powi(2)).sum();
    let stderr = (residuals / (n - 2.0) / sxx).sqrt();
    // Exact lines (and rounding below a byte) have no error to speak of.
    let t = if stderr * span < 1.0 { f64::INFINITY } else { slope / stderr };
    Some(Fit { slope, t, span })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn memcg(points: &[(f64, u64)], limit: u64) -> Vec<TimelinePoint> {
        points
            .iter()
            .map(|&(t_s, usage)| TimelinePoint {
                t_s,
                rss_bytes: usage / 2,
                memcg_usage_bytes: usage,
                memcg_limit_bytes: limit,
                ..TimelinePoint::default()
            })
            .collect()
    }

    #[test]
    fn steady_growth_reaches_the_limit_at_its_rate() {
        // 1 MiB/s from 100 MiB: at 160 MiB after 60 s, 352 MiB left of 512 MiB.
        let points: Vec<(f64, u64)> =
            (0..=12u32).map(|i| (f64::from(i) * 5.0, (100 + 5 * u64::from(i)) * MIB)).collect();
        let ttl = time_to_limit(&memcg(&points, 512 * MIB), WINDOW_S);
        assert_eq!(ttl.state, LimitState::Growing);
        assert_eq!(ttl.basis, "memcg");
        assert_eq!((ttl.usage_bytes, ttl.limit_bytes), (160 * MIB, 512 * MIB));
        assert!((ttl.growth_bytes_per_s - MIB as f64).abs() < 1e-3, "{}", ttl.growth_bytes_per_s);
        let seconds = ttl.seconds.expect("an ETA");
        assert!((seconds - 352.0).abs() < 1e-6, "{seconds}");
        assert!((ttl.window_s - 60.0).abs() < 1e-9);
    }

    #[test]
    fn only_the_recent_window_sets_the_rate() {
        // Fast growth long ago, then 100 KiB/s for the last 10 minutes.
        let mut points = Vec::new();
        for i in 0..=60u32 {
            points.push((f64::from(i), 10 * MIB + u64::from(i) * 10 * MIB));
        }
        let base = 610 * MIB;
        for i in 1..=60u32 {
            points.push((60.0 + f64::from(i) * 10.0, base + u64::from(i) * 1000 * 1024));
        }
        let ttl = time_to_limit(&memcg(&points, 2048 * MIB), WINDOW_S);
        assert_eq!(ttl.state, LimitState::Growing);
        assert!((ttl.growth_bytes_per_s - 102_400.0).abs() < 1.0, "{}", ttl.growth_bytes_per_s);
        assert!((ttl.window_s - 300.0).abs() < 1e-9);
    }

    #[test]
    fn flat_noise_is_not_growing() {
        // ±2 MiB of noise around 200 MiB, no trend.
        let noise = [0i64, 2, -1, 1, -2, 0, 2, -2, 1, -1, 0, 1, -1, 2, -2, 0];
        let points: Vec<(f64, u64)> = noise
            .iter()
            .enumerate()
            .map(|(i, n)| (i as f64 * 5.0, (200 * MIB).saturating_add_signed(n * MIB.cast_signed())))
            .collect();
        let ttl = time_to_limit(&memcg(&points, 512 * MIB), WINDOW_S);
        assert_eq!(ttl.state, LimitState::NotGrowing, "{ttl:?}");
        assert_eq!(ttl.seconds, None);
    }

    #[test]
    fn shrinking_and_tiny_growth_are_not_growing() {
        let down: Vec<(f64, u64)> = (0..10u32).map(|i| (f64::from(i), (300 - u64::from(i)) * MIB)).collect();
        assert_eq!(time_to_limit(&memcg(&down, 512 * MIB), WINDOW_S).state, LimitState::NotGrowing);
        // One page a second for 20 s: 80 KiB, below the noise floor.
        let pages: Vec<(f64, u64)> =
            (0..=20u32).map(|i| (f64::from(i), 100 * MIB + u64::from(i) * 4096)).collect();
        assert_eq!(time_to_limit(&memcg(&pages, 512 * MIB), WINDOW_S).state, LimitState::NotGrowing);
    }

    #[test]
    fn no_limit_is_said_with_the_rate() {
        let points: Vec<(f64, u64)> =
            (0..=10u32).map(|i| (f64::from(i), (100 + u64::from(i)) * MIB)).collect();
        let ttl = time_to_limit(&memcg(&points, 0), WINDOW_S);
        assert_eq!(ttl.state, LimitState::NoLimit);
        assert_eq!(ttl.seconds, None);
        assert!((ttl.growth_bytes_per_s - MIB as f64).abs() < 1e-3);
    }

    #[test]
    fn without_cgroup_usage_rss_is_compared() {
        let points: Vec<TimelinePoint> = (0..=10u32)
            .map(|i| TimelinePoint {
                t_s: f64::from(i),
                rss_bytes: (50 + 2 * u64::from(i)) * MIB,
                memcg_limit_bytes: 100 * MIB,
                ..TimelinePoint::default()
            })
            .collect();
        let ttl = time_to_limit(&points, WINDOW_S);
        assert_eq!((ttl.state, ttl.basis.as_str()), (LimitState::Growing, "rss"));
        // 70 MiB used, 30 MiB left at 2 MiB/s.
        assert!((ttl.seconds.expect("an ETA") - 15.0).abs() < 1e-6);
    }

    #[test]
    fn at_the_limit_is_reached() {
        let points = memcg(&[(0.0, 400 * MIB), (1.0, 512 * MIB)], 512 * MIB);
        let ttl = time_to_limit(&points, WINDOW_S);
        assert_eq!((ttl.state, ttl.seconds), (LimitState::Reached, Some(0.0)));
    }

    #[test]
    fn too_few_points_are_unknown() {
        assert_eq!(time_to_limit(&[], WINDOW_S).state, LimitState::Unknown);
        let two = memcg(&[(0.0, 100 * MIB), (5.0, 200 * MIB)], 512 * MIB);
        assert_eq!(time_to_limit(&two, WINDOW_S).state, LimitState::Unknown);
        let two = memcg(&[(0.0, 100 * MIB), (5.0, 200 * MIB)], 0);
        assert_eq!(time_to_limit(&two, WINDOW_S).state, LimitState::NoLimit);
    }

    #[test]
    fn culprit_rates_give_their_own_eta() {
        assert_eq!(seconds_at_rate(100, 10.0), Some(10.0));
        assert_eq!(seconds_at_rate(100, 0.0), None);
        assert_eq!(seconds_at_rate(100, -5.0), None);
        assert_eq!(seconds_at_rate(100, f64::NAN), None);
    }
}
