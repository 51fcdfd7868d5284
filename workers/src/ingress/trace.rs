//! The trace of a consumed Kafka message: the ingress continues the producer's trace from the
//! message's W3C `traceparent` header, so the inbox row and the job, signal or workflow start
//! it produces belong to the trace of the request that wrote the outbox row (decision 0011).
//! Kept out of `ingress.rs`, which only calls [`message_span`].
use crate::ingress::IngressMessage;
use ledgerflow_engine::trace;
use tracing::Span;

/// The span of applying `msg` (none with tracing off): a child of the span its `traceparent`
/// header names, or a root when it carries none. Jobs built and workflows started inside it
/// store its context.
pub fn message_span(msg: &IngressMessage) -> Span {
    if !trace::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "kafka.consume",
        otel.name = %format_args!("{} process", msg.topic),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.destination = %msg.topic,
        messaging.kafka.partition = msg.partition,
        messaging.kafka.offset = msg.offset,
    );
    trace::continue_from(&span, msg.header(trace::TRACEPARENT));
    span
}
