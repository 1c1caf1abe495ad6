//! Sending the trace where a fleet already looks, while it runs: profiles to Grafana
//! Pyroscope ([`pyroscope`]) and to an OpenTelemetry collector ([`otlp`]), by a
//! [`Pusher`] each.

pub mod otlp;
mod pusher;
pub mod pyroscope;

pub use pusher::{Destination, PushError, Pusher};
