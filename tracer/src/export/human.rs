//! Human-readable sizes, durations and rates shared by the text report and the SVG title.

pub(crate) use crate::units::human_bytes as bytes;

/// `+400.0 KiB/s`, `-1.0 MiB/s`, `0 B/s`.
pub(crate) fn rate(bytes_per_s: f64) -> String {
    if !bytes_per_s.is_finite() {
        return "unknown".to_string();
    }
    let magnitude = bytes_per_s.abs().round() as u64;
    if magnitude == 0 {
        return "0 B/s".to_string();
    }
    let sign = if bytes_per_s < 0.0 { '-' } else { '+' };
    format!("{sign}{}/s", bytes(magnitude))
}

/// `0.5s`, `29.5s`, `5m 3s`, `1h 2m 3s`.
pub(crate) fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs <= 0.0 {
        return "0.0s".to_string();
    }
    if secs < 59.95 {
        return format!("{secs:.1}s");
    }
    let total = secs.round() as u64;
    let (hours, minutes, seconds) = (total / 3600, total / 60 % 60, total % 60);
    if hours > 0 { format!("{hours}h {minutes}m {seconds}s") } else { format!("{minutes}m {seconds}s") }
}

/// "1 allocation", "3 allocations".
pub(crate) fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 { format!("1 {one}") } else { format!("{n} {many}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_durations() {
        assert_eq!(rate(409_600.0), "+400.0 KiB/s");
        assert_eq!(rate(-10.5), "-11 B/s");
        assert_eq!(rate(0.2), "0 B/s");
        assert_eq!(rate(f64::NAN), "unknown");
        assert_eq!(duration(0.26), "0.3s");
        assert_eq!(duration(29.5), "29.5s");
        assert_eq!(duration(59.97), "1m 0s");
        assert_eq!(duration(303.0), "5m 3s");
        assert_eq!(duration(3723.0), "1h 2m 3s");
        assert_eq!(duration(-1.0), "0.0s");
    }
}
