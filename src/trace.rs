//! W3C trace context and OpenTelemetry spans (contract section 6), so one
//! assignment shows as one trace from the CRM's publish to the WeChat call.
//!
//! The CRM writes `traceparent` (and maybe `tracestate`) as AMQP headers. A
//! delivery's header is parsed into a [`Ctx`] (25 bytes, kept on the
//! delivery); a malformed value is ignored and counted, never an error. With
//! export on, each event gets a `receive` span under the CRM's context, and the
//! [`Ctx`] kept is that span's: every retry, dead-letter and signal copy then
//! names the service's own span (same trace id, our span id), so a replayed
//! message continues the trace. With export off (no `OTEL_EXPORTER_OTLP_*`
//! endpoint), no span is made at all and copies keep the CRM's header as it
//! came: near-zero cost, and the trace is still not broken.
//!
//! Spans are made with the OpenTelemetry API directly rather than through
//! `tracing` spans: a notice covers events that arrived in other tasks, which
//! is a span *link* per event, and the parent of each span must be chosen
//! explicitly. The notice's `tracing` span (its log lines' fields) is not
//! exported: its OpenTelemetry span is made current around the same future.
//! The export is the SDK's batch processor, which runs on a thread of its own
//! with a blocking HTTP client: the service's single runtime thread never
//! encodes or sends a batch, and an unreachable collector loses spans (the
//! SDK drops them when its queue is full), never deliveries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use lapin::types::AMQPValue;
use lapin::BasicProperties;
use opentelemetry::trace::{
    Link, SpanBuilder, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId,
    TraceState,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// The AMQP header names (W3C trace context over message headers).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// At most this many links on one span: the SDK's default span link limit
/// (`OTEL_SPAN_LINK_COUNT_LIMIT`, 128). The rest are counted in
/// `notifier.links_dropped`.
pub const LINK_LIMIT: usize = 128;

/// The tracer, set once when export is on.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();
/// The provider, shut down (its last batch flushed) at exit.
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);
/// Malformed `traceparent` headers seen (exported by `/metrics`).
static MALFORMED: AtomicU64 = AtomicU64::new(0);
/// Spans in batches the collector did not take (exported by `/metrics`).
static LOST: AtomicU64 = AtomicU64::new(0);

/// The OTLP exporter, counting the spans of every batch that failed (an
/// unreachable or refusing collector): spans are lost, and an operator sees
/// how many.
#[derive(Debug)]
struct Counting<E>(E);

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Counting<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let n = batch.len() as u64;
        let r = self.0.export(batch).await;
        if r.is_err() {
            LOST.fetch_add(n, Ordering::Relaxed);
        }
        r
    }

    fn shutdown_with_timeout(
        &mut self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.0.set_resource(resource);
    }
}

/// Spans the collector did not take so far (failed exports).
pub fn lost_count() -> u64 {
    LOST.load(Ordering::Relaxed)
}

/// One span's identity as W3C `traceparent` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = &s[2 * i..2 * i + 2];
        // Lowercase hex only (W3C): `from_str_radix` alone accepts `+` and capitals.
        if !pair
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        *o = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

impl Ctx {
    /// Parses a `traceparent` value (W3C trace context, level 1): version
    /// `00` exactly 55 characters; a later version may add fields after a
    /// dash, which are ignored; `ff`, all-zero ids and any other shape are
    /// rejected.
    pub fn parse(value: &str) -> Option<Ctx> {
        let value = value.trim();
        let mut parts = value.splitn(5, '-');
        let version = hex_to::<1>(parts.next()?)?[0];
        let trace_id = hex_to::<16>(parts.next()?)?;
        let span_id = hex_to::<8>(parts.next()?)?;
        let flags = hex_to::<1>(parts.next()?)?[0];
        let rest = parts.next();
        if version == 0xff || (version == 0 && rest.is_some()) {
            return None;
        }
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Ctx {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The `traceparent` value naming this span (version 00).
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            self.flags
        )
    }

    pub fn trace_id_hex(&self) -> String {
        TraceId::from_bytes(self.trace_id).to_string()
    }

    fn span_context(&self, state: TraceState) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::new(self.flags),
            true,
            state,
        )
    }

    fn of(sc: &SpanContext) -> Option<Ctx> {
        sc.is_valid().then(|| Ctx {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
        })
    }
}

/// A text header, as amqplib (LongString) or other clients (ShortString) write it.
fn text_header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a [u8]> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}

/// The CRM's trace context on a delivery: `None` when there is none, or when
/// it is malformed (then counted). Only messages with headers pay more than
/// one branch.
pub fn incoming(props: &BasicProperties) -> Option<Ctx> {
    let raw = match props.headers().as_ref()?.inner().get(TRACEPARENT)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    };
    let parsed = raw.and_then(Ctx::parse);
    if parsed.is_none() {
        MALFORMED.fetch_add(1, Ordering::Relaxed);
    }
    parsed
}

/// Malformed `traceparent` headers seen so far.
pub fn malformed_count() -> u64 {
    MALFORMED.load(Ordering::Relaxed)
}

/// Whether spans are made and exported.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The trace context of a received event: with export on, a `receive` span
/// (a consumer span under the CRM's context, ended at once: the wait in the
/// window is the notice's) and its own context; with export off, the CRM's.
pub fn receive(props: &BasicProperties, queue: &str) -> Option<Ctx> {
    let parent = incoming(props);
    let Some(tracer) = TRACER.get() else {
        return parent;
    };
    let cx = match parent {
        Some(p) => {
            let state = text_header(props, TRACESTATE)
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default();
            Context::new().with_remote_span_context(p.span_context(state))
        }
        None => Context::new(),
    };
    let (name, destination) = receive_names(queue);
    let mut attrs = Vec::with_capacity(4);
    attrs.push(KeyValue::new("messaging.system", "rabbitmq"));
    attrs.push(KeyValue::new("messaging.operation.type", "receive"));
    attrs.push(KeyValue::new("messaging.destination.name", destination));
    if let Some(id) = props.message_id() {
        attrs.push(KeyValue::new(
            "messaging.message.id",
            id.as_str().to_string(),
        ));
    }
    let span = SpanBuilder::from_name(name)
        .with_kind(SpanKind::Consumer)
        .with_attributes(attrs)
        .start_with_context(tracer, &cx);
    let own = Ctx::of(opentelemetry::trace::Span::span_context(&span));
    drop(span); // ends it
    own.or(parent)
}

/// The receive span's name and its `messaging.destination.name`, made once
/// for the work queue (every delivery comes from it): the name is leaked
/// once so each span borrows it, and the value is shared, instead of two
/// strings formatted and copied per event (and copied again by the exporter).
fn receive_names(queue: &str) -> (std::borrow::Cow<'static, str>, opentelemetry::StringValue) {
    static NAMES: OnceLock<(String, &'static str, std::sync::Arc<str>)> = OnceLock::new();
    let (q, name, dest) = NAMES.get_or_init(|| {
        let name: &'static str = Box::leak(format!("{queue} receive").into_boxed_str());
        (queue.to_string(), name, std::sync::Arc::from(queue))
    });
    if q == queue {
        ((*name).into(), dest.clone().into())
    } else {
        (format!("{queue} receive").into(), queue.to_string().into())
    }
}

/// Starts a notice's span (export on): linked to every event it covers (at
/// most [`LINK_LIMIT`]; the rest counted in `notifier.links_dropped`). A
/// notice of one event continues that event's trace; a coalesced one starts
/// its own, linked to each. The context returned is made current around the
/// notice's future ([`within`]), so its call is its child, what it publishes
/// names it and its log lines carry its ids; [`close_notice`] ends it.
///
/// Made with the OpenTelemetry API in one builder, like the receive and
/// call spans, rather than through a `tracing` layer: the layer cost a
/// subscriber lookup per link and attribute, a context built at every poll of
/// the notice's future, and each log line copied into the span (about a
/// third of the CPU tracing added to a drain, counting the export).
pub fn open_notice(
    name: &'static str,
    events: &[Ctx],
    mut attrs: Vec<KeyValue>,
) -> Option<Context> {
    let tracer = TRACER.get()?;
    let parent = match events {
        [one] => Context::new().with_remote_span_context(one.span_context(TraceState::default())),
        _ => Context::new(),
    };
    let links: Vec<Link> = events
        .iter()
        .take(LINK_LIMIT)
        .map(|c| Link::with_context(c.span_context(TraceState::default())))
        .collect();
    attrs.push(KeyValue::new(
        "notifier.links_dropped",
        events.len().saturating_sub(LINK_LIMIT) as i64,
    ));
    let span = SpanBuilder::from_name(name)
        .with_kind(SpanKind::Internal)
        .with_links(links)
        .with_attributes(attrs)
        .start_with_context(tracer, &parent);
    Some(Context::new().with_span(span))
}

/// `fut` with `cx` (a notice's span) current, when there is one.
pub async fn within<F: std::future::Future>(cx: Option<&Context>, fut: F) -> F::Output {
    use opentelemetry::context::FutureExt;
    match cx {
        Some(cx) => fut.with_context(cx.clone()).await,
        None => fut.await,
    }
}

/// Marks the current notice span as a release of held events: a link to
/// each held event's span (the traceparent the ledger kept), within the
/// link limit, and `notifier.released_events`.
pub fn released<'a>(traceparents: impl Iterator<Item = Option<&'a str>>) {
    if !enabled() {
        return;
    }
    Context::map_current(|cx| {
        let span = cx.span();
        let mut n: i64 = 0;
        for tp in traceparents {
            if let Some(c) = tp.and_then(Ctx::parse) {
                if (n as usize) < LINK_LIMIT {
                    span.add_link(c.span_context(TraceState::default()), Vec::new());
                }
            }
            n += 1;
        }
        if n > 0 {
            span.set_attribute(KeyValue::new("notifier.released_events", n));
        }
    });
}

/// Sets the notice span's last attributes (its outcome) and ends it.
pub fn close_notice(cx: Option<Context>, attrs: Vec<KeyValue>) {
    if let Some(cx) = cx {
        let span = cx.span();
        span.set_attributes(attrs);
        span.end();
    }
}

/// Warnings and errors logged inside a span (a notice's, a call's) become
/// events of that span (message, fields and level), so the trace shows what
/// went wrong where; `info` and below stay in the logs, whose lines carry the
/// trace and span ids. Installed only with export on.
pub struct Warnings;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        Context::map_current(|cx| {
            if !cx.has_active_span() {
                return;
            }
            let mut fields = Fields::default();
            event.record(&mut fields);
            fields.attrs.push(KeyValue::new("level", level.as_str()));
            let name = fields
                .message
                .unwrap_or_else(|| event.metadata().name().to_string());
            cx.span().add_event(name, fields.attrs);
        });
    }
}

/// A log line's fields as span event attributes.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    attrs: Vec<KeyValue>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.record_string(field, value.to_string());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.attrs.push(KeyValue::new(field.name(), value));
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.attrs.push(KeyValue::new(
            field.name(),
            i64::try_from(value).unwrap_or(i64::MAX),
        ));
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.attrs.push(KeyValue::new(field.name(), value));
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.attrs.push(KeyValue::new(field.name(), value));
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.record_string(field, format!("{value:?}"));
    }
}

impl Fields {
    fn record_string(&mut self, field: &tracing::field::Field, value: String) {
        if field.name() == "message" {
            self.message = Some(value);
        } else {
            self.attrs.push(KeyValue::new(field.name(), value));
        }
    }
}

/// The trace and span ids of the current span (a notice's, or its call's),
/// for the JSON log format.
pub fn ids() -> Option<(TraceId, SpanId)> {
    Context::map_current(|cx| {
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
    })
}

/// The current span's context (the notice's, inside its future), for the
/// `traceparent` of a signal or a copy made there.
pub fn current() -> Option<Ctx> {
    if !enabled() {
        return None;
    }
    Context::map_current(|cx| Ctx::of(cx.span().span_context()))
}

/// Starts a client span for an HTTP call under the current context (the
/// notice's). `url` must hold no secret: callers pass it without its query.
pub fn http_client_span(method: &'static str, url: &reqwest::Url) -> Option<Context> {
    let tracer = TRACER.get()?;
    let mut full = url.clone();
    // The access token travels in the query: never in an attribute.
    full.set_query(None);
    let _ = full.set_password(None);
    let _ = full.set_username("");
    let mut attrs = vec![
        KeyValue::new("http.request.method", method),
        KeyValue::new("url.full", full.to_string()),
        KeyValue::new("server.address", url.host_str().unwrap_or("").to_string()),
    ];
    if let Some(port) = url.port_or_known_default() {
        attrs.push(KeyValue::new("server.port", i64::from(port)));
    }
    let span = SpanBuilder::from_name(method)
        .with_kind(SpanKind::Client)
        .with_attributes(attrs)
        .start_with_context(tracer, &Context::current());
    Some(Context::current().with_span(span))
}

/// `fut` with the current trace context (the notice's), for a task it
/// spawns: a signal published there names the span that raised it.
pub fn carry<F: std::future::Future>(fut: F) -> opentelemetry::context::WithContext<F> {
    use opentelemetry::context::FutureExt;
    fut.with_context(Context::current())
}

/// Adds attributes to the span of `cx`, if any.
pub fn set(cx: Option<&Context>, attrs: Vec<KeyValue>) {
    if let Some(cx) = cx {
        cx.span().set_attributes(attrs);
    }
}

/// Adds attributes to the current span (inside a span's future), if any.
pub fn set_current(attrs: Vec<KeyValue>) {
    if enabled() {
        Context::map_current(|cx| cx.span().set_attributes(attrs));
    }
}

/// An event on the current span (an attempt, a wait).
pub fn event(name: &'static str, attrs: Vec<KeyValue>) {
    if enabled() {
        Context::map_current(|cx| cx.span().add_event(name, attrs));
    }
}

/// Ends the span of `cx`.
pub fn end(cx: Option<Context>) {
    if let Some(cx) = cx {
        cx.span().end();
    }
}

/// Whether the standard variables ask for OTLP export.
fn export_asked() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
        && !std::env::var("OTEL_SDK_DISABLED").is_ok_and(|s| s.eq_ignore_ascii_case("true"))
}

/// Starts OTLP/HTTP export when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces
/// endpoint) is set; the SDK reads the other standard variables
/// (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
/// `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_TIMEOUT`).
/// `Ok(false)`: not asked.
///
/// # Errors
/// The exporter could not be built (a bad endpoint URL): one line.
pub fn init() -> Result<bool, String> {
    if !export_asked() || TRACER.get().is_some() {
        return Ok(TRACER.get().is_some());
    }
    // Built on a thread of its own: the blocking HTTP client starts a runtime
    // of its own, which must not be made (or dropped) on an async thread.
    let built = std::thread::spawn(|| {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(|e| format!("cannot start the OTLP exporter: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            resource = resource.with_service_name("wechat-notifier");
        }
        let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(Counting(exporter))
            .with_batch_config(batch_config())
            .build();
        Ok::<_, String>(
            SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_resource(resource.build())
                .build(),
        )
    })
    .join()
    .map_err(|_| "cannot start the OTLP exporter".to_string())??;
    let tracer = opentelemetry::trace::TracerProvider::tracer(&built, "wechat-notifier");
    *PROVIDER.lock().unwrap_or_else(|p| p.into_inner()) = Some(built);
    let _ = TRACER.set(tracer);
    Ok(true)
}

/// Spans the batch processor may hold before it drops new ones, unless
/// `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise. The SDK's 2,048 is a burst of
/// well under a second here (a drain makes one span per event): the trace
/// bench row lost up to 4 % of its spans with it. Each place is allocated
/// when export starts (a `SpanData`, 352 bytes, and its slot: 6 MB in all).
pub const QUEUE_SIZE: usize = 16_384;
/// Spans per OTLP request, unless `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` says
/// otherwise: four times the SDK's 512, a quarter of the requests (about
/// 1 MB each) during a drain.
pub const EXPORT_BATCH_SIZE: usize = 2_048;

/// The batch processor's settings: the SDK's (and the `OTEL_BSP_*`
/// variables'), with this service's queue and batch sizes where no variable
/// sets them.
fn batch_config() -> opentelemetry_sdk::trace::BatchConfig {
    let unset = |v: &str| std::env::var(v).is_err();
    let mut b = opentelemetry_sdk::trace::BatchConfigBuilder::default();
    if unset("OTEL_BSP_MAX_QUEUE_SIZE") {
        b = b.with_max_queue_size(QUEUE_SIZE);
    }
    if unset("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
        b = b.with_max_export_batch_size(EXPORT_BATCH_SIZE);
    }
    b.build()
}

/// Flushes and stops the export (at exit; spans ended later are lost).
pub fn shutdown() {
    let provider = PROVIDER.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(p) = provider {
        let _ = p.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_writes_back_the_w3c_example() {
        let c = Ctx::parse(GOOD).expect("valid");
        assert_eq!(c.header(), GOOD);
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.flags, 1);
    }

    #[test]
    fn rejects_what_w3c_rejects() {
        for bad in [
            "",
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(Ctx::parse(bad), None, "{bad:?}");
        }
        // A later version may append fields.
        assert!(Ctx::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some());
    }

    #[test]
    fn reads_long_and_short_string_headers_and_counts_the_malformed() {
        use lapin::types::FieldTable;
        let with = |v: AMQPValue| {
            let mut t = FieldTable::default();
            t.insert(TRACEPARENT.into(), v);
            BasicProperties::default().with_headers(t)
        };
        assert!(incoming(&with(AMQPValue::LongString(GOOD.into()))).is_some());
        assert!(incoming(&with(AMQPValue::ShortString(GOOD.into()))).is_some());
        let before = malformed_count();
        assert!(incoming(&with(AMQPValue::LongString("nope".into()))).is_none());
        assert!(incoming(&with(AMQPValue::LongLongInt(7))).is_none());
        assert_eq!(malformed_count(), before + 2);
        assert!(incoming(&BasicProperties::default()).is_none());
        assert_eq!(malformed_count(), before + 2);
    }
}
