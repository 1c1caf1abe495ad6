//! Sampling arithmetic (shared with the kernel through `tracer_common::sampling`): the
//! estimates must be unbiased.

use tracer_common::{MALLOC_COUNT_ONE, sampling};

/// Expected estimate of one allocation of `size` bytes: probability of being kept times
/// what it then stands for.
fn expected(size: u64, period: u64) -> (f64, f64) {
    let p = sampling::sample_threshold(size, period).map_or(1.0, |t| t as f64 / 2f64.powi(32));
    let bytes = p * sampling::weight_bytes(size, period) as f64;
    let count = p * sampling::weight_count(size, period) as f64 / MALLOC_COUNT_ONE as f64;
    (bytes, count)
}

#[test]
fn every_size_is_estimated_without_bias() {
    for period in [2, 4096, 512 * 1024, 1 << 32] {
        for size in [0, 1, 7, 16, 100, 1000, 4095, 4096, 65_537, 512 * 1024 - 1, 512 * 1024, 1 << 30] {
            let (bytes, count) = expected(size, period);
            assert!(
                (bytes - size as f64).abs() <= 1.0,
                "period {period}, size {size}: expected bytes {bytes}"
            );
            assert!((count - 1.0).abs() < 1e-4, "period {period}, size {size}: expected count {count}");
        }
    }
}

#[test]
fn no_sampling_keeps_everything_at_its_size() {
    for period in [0, 1] {
        assert!(!sampling::is_sampling(period));
        assert_eq!(sampling::sample_threshold(123, period), None);
        assert_eq!(sampling::weight_bytes(123, period), 123);
        assert_eq!(sampling::weight_count(123, period), MALLOC_COUNT_ONE);
    }
    assert_eq!(sampling::weight_bytes(0, 0), 0, "malloc(0) holds no bytes");
}

/// A deterministic xorshift generator standing in for `bpf_get_prandom_u32`.
struct XorShift(u64);

impl XorShift {
    fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u32
    }
}

#[test]
fn sampled_totals_converge_on_the_truth() {
    let period = 64 * 1024;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let (mut true_bytes, mut true_count) = (0.0, 0.0);
    let (mut est_bytes, mut est_count, mut kept) = (0.0, 0.0, 0u64);
    // Variance of the Horvitz-Thompson estimates: sum of x^2 (1 - p) / p.
    let (mut var_bytes, mut var_count) = (0.0, 0.0);
    for i in 0..400_000u64 {
        // A mix of small, medium and large allocations.
        let size = match i % 10 {
            0..=6 => 16 + u64::from(rng.next_u32() % 256),
            7 | 8 => 1024 + u64::from(rng.next_u32() % 8192),
            _ => 100_000 + u64::from(rng.next_u32() % 10_000),
        };
        let threshold = sampling::sample_threshold(size, period);
        let p = threshold.map_or(1.0, |t| t as f64 / 2f64.powi(32));
        true_bytes += size as f64;
        true_count += 1.0;
        var_bytes += (size as f64).powi(2) * (1.0 - p) / p;
        var_count += (1.0 - p) / p;
        if threshold.is_none_or(|t| u64::from(rng.next_u32()) < t) {
            kept += 1;
            est_bytes += sampling::weight_bytes(size, period) as f64;
            est_count += sampling::weight_count(size, period) as f64 / MALLOC_COUNT_ONE as f64;
        }
    }
    let bytes_sigmas = (est_bytes - true_bytes).abs() / var_bytes.sqrt();
    let count_sigmas = (est_count - true_count).abs() / var_count.sqrt();
    assert!(
        bytes_sigmas < 4.0,
        "bytes: estimated {est_bytes:.0}, true {true_bytes:.0} ({bytes_sigmas:.1} σ)"
    );
    assert!(
        count_sigmas < 4.0,
        "count: estimated {est_count:.0}, true {true_count:.0} ({count_sigmas:.1} σ)"
    );
    // The byte estimate is what users read: within 2% here, from few samples.
    assert!((est_bytes - true_bytes).abs() / true_bytes < 0.02, "bytes {est_bytes:.0} vs {true_bytes:.0}");
    assert!(kept < 400_000 / 5, "sampling kept {kept} of 400000 allocations");
}

#[test]
fn sizes_parse() {
    use super::parse_size;
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("64k"), Ok(64 * 1024));
    assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
    assert_eq!(parse_size("1MiB"), Ok(1 << 20));
    assert_eq!(parse_size("2g"), Ok(2 << 30));
    assert!(parse_size("12q").is_err());
    assert!(parse_size("k").is_err());
}
