//! Duty cycling of the allocation probes (`--malloc-duty PERCENT`, node-buffers only).
//!
//! A uprobe costs its trap whatever its program does, so the only way to pay less for
//! allocations is to probe fewer of them: the allocation probes are attached for the first
//! `PERCENT` of every period and detached for the rest, while the frees stay probed (a
//! Buffer allocated in a window and freed outside it is still seen freed, so nothing
//! becomes a false leak; frees of Buffers allocated outside a window are ignored, as frees
//! of blocks allocated before tracing are).
//!
//! The held bytes and blocks are scaled by `elapsed / armed` time, measured, not nominal.
//! The estimate is unbiased when allocations arrive independently of the windows' phase
//! (a leak at a steady or randomly varying rate); it is biased when the load itself is
//! periodic with the window's period, and it is coarse for a stack that allocates only a
//! few blocks (each one seen counts `1 / duty` times, or not at all).

use std::time::{Duration, Instant};

/// One cycle: armed for `on`, then off until `period` has passed.
pub const PERIOD: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, Copy)]
pub struct DutyCycle {
    on: Duration,
    started: Instant,
    phase_start: Instant,
    armed: bool,
    /// Armed time of the finished windows.
    armed_before: Duration,
}

/// What the caller must do to the allocation probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    Arm,
    Disarm,
}

impl DutyCycle {
    /// A cycle armed `percent` of the time, starting armed at `now`; `None` for 100%.
    #[must_use]
    pub fn new(percent: u32, now: Instant) -> Option<Self> {
        (percent < 100).then(|| Self {
            on: PERIOD * percent.max(1) / 100,
            started: now,
            phase_start: now,
            armed: true,
            armed_before: Duration::ZERO,
        })
    }

    /// The switch due at `now`, if any (call it at least once a second).
    pub fn due(&mut self, now: Instant) -> Option<Switch> {
        let in_phase = now.saturating_duration_since(self.phase_start);
        if self.armed && in_phase >= self.on {
            self.armed = false;
            self.armed_before += in_phase;
            return Some(Switch::Disarm);
        }
        if !self.armed && in_phase >= PERIOD {
            self.armed = true;
            self.phase_start = now;
            return Some(Switch::Arm);
        }
        None
    }

    /// The share of the time since the start that the allocation probes were attached.
    #[must_use]
    pub fn armed_share(&self, now: Instant) -> f64 {
        let current =
            if self.armed { now.saturating_duration_since(self.phase_start) } else { Duration::ZERO };
        let armed = (self.armed_before + current).as_secs_f64();
        let total = now.saturating_duration_since(self.started).as_secs_f64();
        if total <= 0.0 || armed <= 0.0 { 1.0 } else { (armed / total).min(1.0) }
    }

    /// Stops the cycle (the probes are being removed for good).
    pub fn stop(&mut self, now: Instant) {
        if self.armed {
            self.armed_before += now.saturating_duration_since(self.phase_start);
            self.armed = false;
        }
        // No further arming: the phase never ends.
        self.phase_start = now + Duration::from_secs(u64::from(u32::MAX));
    }
}

/// `value` observed while armed a `share` of the time, scaled to the whole time.
#[must_use]
pub fn scale(value: u64, share: f64) -> u64 {
    if share >= 1.0 || share <= 0.0 { value } else { (value as f64 / share).round() as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarter_duty_arms_one_second_in_four() {
        let t0 = Instant::now();
        let mut cycle = DutyCycle::new(25, t0).expect("a cycle below 100%");
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(cycle.due(at(500)), None);
        assert_eq!(cycle.due(at(1000)), Some(Switch::Disarm));
        assert_eq!(cycle.due(at(2000)), None);
        assert_eq!(cycle.due(at(4000)), Some(Switch::Arm));
        assert_eq!(cycle.due(at(5000)), Some(Switch::Disarm));
        // Armed 2 s of 8 s.
        assert!((cycle.armed_share(at(8000)) - 0.25).abs() < 1e-9, "{}", cycle.armed_share(at(8000)));
        assert_eq!(scale(1000, cycle.armed_share(at(8000))), 4000);
    }

    #[test]
    fn late_ticks_are_measured_not_assumed() {
        let t0 = Instant::now();
        let mut cycle = DutyCycle::new(25, t0).expect("a cycle");
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The tick comes late: armed 1.5 s, then off until 4 s.
        assert_eq!(cycle.due(at(1500)), Some(Switch::Disarm));
        assert!((cycle.armed_share(at(4000)) - 0.375).abs() < 1e-9);
        cycle.stop(at(4000));
        assert_eq!(cycle.due(at(100_000)), None, "never re-armed after stop");
    }

    #[test]
    fn full_duty_is_no_cycle() {
        assert!(DutyCycle::new(100, Instant::now()).is_none());
        assert_eq!(scale(7, 1.0), 7);
    }
}
