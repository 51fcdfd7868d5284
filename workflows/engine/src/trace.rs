//! Trace context: whether OpenTelemetry tracing is on, and the W3C `traceparent` of a span —
//! read to store it with a job, a workflow or an outbox row, and parsed back to continue the
//! trace it names (docs/decisions/0011).
//!
//! Everything here is behind one relaxed atomic load: the binary calls [`enable`] only after it
//! installed an OpenTelemetry layer, so with tracing off no span is built for the trace and no
//! context is read or written (a `NULL` is stored). The propagator is whatever the binary set
//! globally (the W3C trace context one), so these functions never name a format themselves.
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header (and carrier key) W3C trace context travels under.
pub const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns tracing on for this process (called once, after the OpenTelemetry layer is installed).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// True when this process exports traces.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// One-entry carrier: the propagator writes and reads `traceparent` (and, when present,
/// `tracestate`, which is not stored).
#[derive(Default)]
struct Carrier(HashMap<String, String>);

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The `traceparent` of `span` (`None` with tracing off, or when the span is not recorded).
pub fn traceparent_of(span: &Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Carrier::default();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.0.remove(TRACEPARENT)
}

/// The `traceparent` of the current span: what a job, a workflow or an outbox row written now
/// stores.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    traceparent_of(&Span::current())
}

/// Makes `span` (not yet entered) a child of the remote span `traceparent` names; a missing or
/// malformed value leaves the span where it was (a child of the current span, or a root).
pub fn continue_from(span: &Span, traceparent: Option<&str>) {
    if !enabled() {
        return;
    }
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier = Carrier::default();
    carrier.set(TRACEPARENT, traceparent.to_owned());
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    if cx.span().span_context().is_valid() {
        // Fails only when the span was entered already or no OpenTelemetry layer exists: the
        // span then stays where it is, which is all a caller could do about it.
        let _ = span.set_parent(cx);
    }
}

/// The trace id (32 lowercase hex digits) a `traceparent` names, without a propagator: for
/// showing a stored context (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    let valid = id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0');
    valid.then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_reads_a_w3c_traceparent_and_refuses_anything_else() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id("00-4bf92f35-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id(""), None);
    }

    #[test]
    fn with_tracing_off_nothing_is_read_or_stored() {
        // `enable` is never called in this test binary's unit tests.
        assert!(!enabled());
        let span = tracing::info_span!("x");
        assert_eq!(traceparent_of(&span), None);
        assert_eq!(current_traceparent(), None);
    }
}
