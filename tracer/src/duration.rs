//! Durations as users write them: `500ms`, `30s`, `5m`, `1h`, or plain seconds.

use std::time::Duration;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 =
        num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 30s, 5m, 1h"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!("invalid duration unit {unit:?} in {s:?}: use ms, s, m or h"));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= MAX)
        .ok_or_else(|| format!("duration {s:?} is too long: at most {}h", MAX.as_secs() / 3600))
}

/// The longest duration accepted: a century, far beyond any trace, and far from the
/// overflow of a clock reading plus it.
pub const MAX: Duration = Duration::from_hours(100 * 365 * 24);

/// `now + d`, or `None` when that is past the clock's range (then it never comes).
#[must_use]
pub fn deadline(now: tokio::time::Instant, d: Duration) -> Option<tokio::time::Instant> {
    now.checked_add(d)
}

/// `d` in nanoseconds, saturated at `u64::MAX` (585 years).
#[must_use]
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_mins(5)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_hours(1)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn too_long_is_an_error_not_a_panic() {
        let err = parse_duration("99999999999999999999h").expect_err("1e20 hours");
        assert!(err.contains("too long"), "{err}");
        assert!(parse_duration("876000h").is_ok(), "a century is accepted");
        assert!(parse_duration("876001h").is_err());
        assert!(parse_duration("1e400s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn deadlines_saturate() {
        let now = tokio::time::Instant::now();
        assert_eq!(deadline(now, Duration::MAX), None);
        assert_eq!(deadline(now, Duration::from_secs(1)), Some(now + Duration::from_secs(1)));
    }
}
