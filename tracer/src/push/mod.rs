//! Sending the trace where a fleet already looks, while it runs: profiles to Grafana
//! Pyroscope ([`pyroscope`]).

pub mod pyroscope;
