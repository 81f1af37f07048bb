//! Trace context (contract section 6), as an SRE's collector and the CRM see
//! it: the replica runs as a process exporting OTLP/HTTP to a collector in
//! this test (an axum route decoding the protobuf), and the events are
//! published with the `traceparent` header the CRM's OpenTelemetry SDK writes.

use crate::common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, metric, readyz, wait_until, TestEnv};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;
use wechat_notifier::broker::{header_str, ROUTING_KEY};
use wechat_notifier::sim::FaultAction;

const WAIT: Duration = Duration::from_secs(30);

/// What the test collector received: every request's bytes, and the spans.
#[derive(Default, Clone)]
struct Collector {
    bytes: Arc<Mutex<Vec<u8>>>,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    /// Serves OTLP/HTTP on a free port: the endpoint for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    async fn start() -> (Collector, String) {
        let c = Collector::default();
        let state = c.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    state.bytes.lock().unwrap().extend_from_slice(&body);
                    let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut spans = state.spans.lock().unwrap();
                    for rs in req.resource_spans {
                        for ss in rs.scope_spans {
                            spans.extend(ss.spans);
                        }
                    }
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (c, format!("http://{addr}"))
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    fn named(&self, prefix: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.name.starts_with(prefix))
            .collect()
    }

    fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &Span, key: &str) -> Option<AnyValue> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone())
        .and_then(|v| v.value)
}

/// No access token the simulator issued, no AppSecret and no person's or
/// customer's name of `events` in `bytes` (what the collector received).
fn assert_nothing_secret(bytes: &[u8], env: &TestEnv, events: &[Value]) {
    let tokens = env.sim.issued_tokens();
    assert!(!tokens.is_empty());
    for t in &tokens {
        assert!(!contains(bytes, t), "an access token was exported");
    }
    assert!(
        !contains(bytes, &env.sim.config().secret),
        "the secret was exported"
    );
    for e in events {
        for who in [&e["customer"], &e["assignee"], &e["assigned_by"]] {
            let name = who["name"].as_str().unwrap();
            assert!(!contains(bytes, name), "a name was exported: {name}");
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
}

/// A W3C traceparent with a trace id and span id made from `n`.
fn traceparent(n: u32) -> (String, String, String) {
    let trace = format!(
        "{:08x}4bf92f3577b34da6a3ce929d",
        n.wrapping_add(0x1000_0000)
    );
    let span = format!("{:08x}0ba902b7", n.wrapping_add(0x2000_0000));
    (format!("00-{trace}-{span}-01"), trace, span)
}

/// Environment with export on to `endpoint`, batches sent every 100 ms.
async fn traced_env(tag: &str, endpoint: &str) -> TestEnv {
    let mut env = TestEnv::new(tag).await;
    env.set("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    env.set("OTEL_SERVICE_NAME", "wechat-notifier-test");
    env.set("OTEL_TRACES_SAMPLER", "parentbased_always_on");
    env.set("OTEL_BSP_SCHEDULE_DELAY", "100");
    env.set("OTEL_EXPORTER_OTLP_TIMEOUT", "2000");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "200");
    env
}

/// Publishes `events` as the CRM does, each with its `traceparent` header
/// value (or none), confirmed.
async fn publish_traced(env: &TestEnv, events: &[(Value, Option<AMQPValue>)]) {
    for (e, tp) in events {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(e["event_id"].as_str().unwrap().into())
            .with_delivery_mode(2);
        if let Some(v) = tp {
            let mut t = FieldTable::default();
            t.insert("traceparent".into(), v.clone());
            props = props.with_headers(t);
        }
        env.channel
            .basic_publish(
                env.exchange().as_str().into(),
                ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(e).unwrap(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// Twelve events for one assignee, each from its own CRM trace: each gets a
/// receive span under the CRM's span, the one coalesced notice has twelve
/// links with those trace ids, the WeChat call is a client span under the
/// notice, and neither the access token nor a customer's name is anywhere in
/// the exported bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_notice_links_the_twelve_traces_it_covers() {
    let (collector, endpoint) = Collector::start().await;
    let mut env = traced_env("trace-12", &endpoint).await;
    env.set("NOTIFIER_LOG_FORMAT", "json");
    env.declare().await;
    let log = std::env::temp_dir().join(format!("{}.log", env.prefix));
    let replica = env.spawn_process_logging(Some(&log));
    assert!(eventually(WAIT, || async { readyz(&replica.http).await.0 == 200 }).await);
    let events = env.bulk(12, 1, true);
    let mut expected = BTreeSet::new();
    let mut parents = Vec::new();
    let mut published = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let (tp, trace, span) = traceparent(i as u32);
        expected.insert(trace.clone());
        parents.push((trace, span));
        // As amqplib writes it (RabbitMQ refuses short strings in a table;
        // the parser takes both, see the unit tests in src/trace.rs).
        published.push((e.clone(), Some(AMQPValue::LongString(tp.as_str().into()))));
    }
    publish_traced(&env, &published).await;
    assert!(
        wait_until(WAIT, || env.notified_ids().len() == 12).await,
        "every event delivered"
    );
    assert_eq!(env.sim.delivered().len(), 1, "one coalesced notice");
    assert!(
        eventually(WAIT, || async {
            !collector.named("notice").is_empty()
                && !collector.named("POST").is_empty()
                && collector.named(&format!("{} receive", env.queue())).len() >= 12
        })
        .await,
        "spans exported: {:?}",
        collector
            .spans()
            .iter()
            .map(|s| &s.name)
            .collect::<Vec<_>>()
    );
    // Each receive span is a child of the CRM's span, in the CRM's trace.
    let receives = collector.named(&format!("{} receive", env.queue()));
    for (trace, span) in &parents {
        assert!(
            receives
                .iter()
                .any(|s| hex(&s.trace_id) == *trace && hex(&s.parent_span_id) == *span),
            "a receive span under {trace}/{span}"
        );
    }
    // The notice: twelve links, one per event's trace.
    let notices = collector.named("notice");
    assert_eq!(notices.len(), 1);
    let notice = &notices[0];
    let linked: BTreeSet<String> = notice.links.iter().map(|l| hex(&l.trace_id)).collect();
    assert_eq!(notice.links.len(), 12);
    assert_eq!(linked, expected);
    assert_eq!(
        attr(notice, "notifier.event_count"),
        Some(AnyValue::IntValue(12))
    );
    assert_eq!(
        attr(notice, "notifier.outcome"),
        Some(AnyValue::StringValue("accepted".into()))
    );
    assert_eq!(
        attr(notice, "notifier.assignee_id"),
        Some(AnyValue::StringValue(
            events[0]["assignee"]["user_id"].as_str().unwrap().into()
        ))
    );
    assert_eq!(
        attr(notice, "notifier.notice_id"),
        Some(AnyValue::StringValue(
            env.sim.delivered()[0]["notice_id"].as_str().unwrap().into()
        ))
    );
    // The WeChat call: a client span (kind 3) under the notice, HTTP semconv.
    let post = &collector.named("POST")[0];
    assert_eq!(post.kind, 3);
    assert_eq!(post.trace_id, notice.trace_id);
    assert_eq!(post.parent_span_id, notice.span_id);
    assert_eq!(
        attr(post, "http.request.method"),
        Some(AnyValue::StringValue("POST".into()))
    );
    assert_eq!(
        attr(post, "http.response.status_code"),
        Some(AnyValue::IntValue(200))
    );
    let Some(AnyValue::StringValue(url)) = attr(post, "url.full") else {
        panic!("url.full set");
    };
    assert!(url.ends_with("/tcb/invokecloudfunction"), "{url}");
    assert!(!url.contains("access_token"), "{url}");
    // The notice's log line leads to its trace.
    let delivered_line: Value = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "notice delivered")
        .expect("a JSON line for the notice");
    assert_eq!(delivered_line["trace_id"], hex(&notice.trace_id).as_str());
    assert_eq!(delivered_line["span_id"], hex(&notice.span_id).as_str());
    // No secret and no customer's name in anything exported.
    assert_nothing_secret(&collector.bytes(), &env, &events);
    replica.sigterm();
    let _ = std::fs::remove_file(&log);
    env.cleanup().await;
}

/// A retried event's copy carries a traceparent naming the service's receive
/// span, so its second delivery continues the CRM's trace; a dead letter
/// carries it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_and_dead_letter_copies_continue_the_trace() {
    let (collector, endpoint) = Collector::start().await;
    let env = traced_env("trace-retry", &endpoint).await;
    env.declare().await;
    let events = env.bulk(2, 2, false);
    let (retried, rejected) = (&events[0], &events[1]);
    // A function that threw: parked in the retry queue at once (contract section 3).
    env.sim.push_fault(common::fault_for(
        retried,
        FaultAction::Errcode(-504002),
        Some(1),
    ));
    env.sim.push_fault(common::fault_for(
        rejected,
        FaultAction::FunctionErrcode(40003),
        None,
    ));
    let replica = env.spawn_process();
    assert!(eventually(WAIT, || async { readyz(&replica.http).await.0 == 200 }).await);
    let (tp0, trace0, span0) = traceparent(100);
    let (tp1, trace1, span1) = traceparent(101);
    publish_traced(
        &env,
        &[
            (
                retried.clone(),
                Some(AMQPValue::LongString(tp0.as_str().into())),
            ),
            (
                rejected.clone(),
                Some(AMQPValue::LongString(tp1.as_str().into())),
            ),
        ],
    )
    .await;
    let id0 = retried["event_id"].as_str().unwrap().to_string();
    assert!(
        wait_until(WAIT, || env.notified_ids().contains(&id0)).await,
        "the retried event is delivered on its second round"
    );
    // Polled: the dead letter is taken (acked) as soon as it is there.
    let mut dead = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while dead.is_empty() && std::time::Instant::now() < deadline {
        dead = env.drain(&env.dead_queue()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!dead.is_empty(), "the rejected event is dead-lettered");
    let receive = format!("{} receive", env.queue());
    assert!(
        eventually(WAIT, || async {
            collector
                .named(&receive)
                .iter()
                .filter(|s| hex(&s.trace_id) == trace0)
                .count()
                >= 2
                && collector
                    .named(&receive)
                    .iter()
                    .any(|s| hex(&s.trace_id) == trace1)
        })
        .await,
        "two receive spans in the retried event's trace"
    );
    let receives = collector.named(&receive);
    let first = receives
        .iter()
        .find(|s| hex(&s.trace_id) == trace0 && hex(&s.parent_span_id) == span0)
        .expect("the first receive under the CRM's span");
    // The second delivery came from the retry copy: its parent is our first receive span.
    assert!(
        receives
            .iter()
            .any(|s| hex(&s.trace_id) == trace0 && s.parent_span_id == first.span_id),
        "the retry copy's traceparent named the service's receive span"
    );
    // The dead letter names the rejected event's receive span, in the CRM's trace.
    let rej = receives
        .iter()
        .find(|s| hex(&s.trace_id) == trace1 && hex(&s.parent_span_id) == span1)
        .expect("the rejected event's receive span");
    let (_, props) = &dead[0];
    assert_eq!(
        header_str(props, "traceparent"),
        Some(format!("00-{trace1}-{}-01", hex(&rej.span_id)))
    );
    replica.sigterm();
    env.cleanup().await;
}

/// A malformed traceparent changes nothing but a counter: the event is
/// delivered, and its receive span starts a trace of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_is_counted_and_ignored() {
    let (collector, endpoint) = Collector::start().await;
    let env = traced_env("trace-bad", &endpoint).await;
    env.declare().await;
    let replica = env.spawn_process();
    assert!(eventually(WAIT, || async { readyz(&replica.http).await.0 == 200 }).await);
    let events = env.bulk(2, 2, false);
    let (good, _, _) = traceparent(7);
    publish_traced(
        &env,
        &[
            (
                events[0].clone(),
                Some(AMQPValue::LongString("00-not-a-trace-01".into())),
            ),
            (
                events[1].clone(),
                Some(AMQPValue::LongString(good.as_str().into())),
            ),
        ],
    )
    .await;
    assert!(
        wait_until(WAIT, || env.notified_ids().len() == 2).await,
        "both delivered"
    );
    assert_eq!(
        metric(
            &replica.http,
            "wechat_notifier_traceparent_malformed_total",
            ""
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&replica.http, "wechat_notifier_dead_letters_total", "").await,
        0.0
    );
    let receive = format!("{} receive", env.queue());
    assert!(
        eventually(WAIT, || async { collector.named(&receive).len() >= 2 }).await,
        "two receive spans"
    );
    assert!(
        collector
            .named(&receive)
            .iter()
            .any(|s| s.parent_span_id.is_empty()),
        "the malformed one is a root"
    );
    replica.sigterm();
    env.cleanup().await;
}

/// The collector refuses connections: every event is still delivered and
/// acked, nothing waits on the export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_loses_spans_never_deliveries() {
    // A port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = traced_env("trace-down", &format!("http://127.0.0.1:{port}")).await;
    env.declare().await;
    let replica = env.spawn_process();
    assert!(eventually(WAIT, || async { readyz(&replica.http).await.0 == 200 }).await);
    let events = env.bulk(40, 8, false);
    let published: Vec<(Value, Option<AMQPValue>)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (tp, _, _) = traceparent(1000 + i as u32);
            (e.clone(), Some(AMQPValue::LongString(tp.as_str().into())))
        })
        .collect();
    publish_traced(&env, &published).await;
    assert!(
        wait_until(WAIT, || env.notified_ids().len() == 40).await,
        "every event delivered"
    );
    assert!(
        eventually(WAIT, || env.settled(&replica.http)).await,
        "every delivery acked"
    );
    // The spans are lost, and counted (batches go every 100 ms).
    assert!(
        eventually(WAIT, || async {
            metric(&replica.http, "wechat_notifier_spans_lost_total", "").await > 0.0
        })
        .await,
        "lost spans counted"
    );
    replica.sigterm();
    env.cleanup().await;
}

/// With the grant ledger on: a 43101 holds the notice, whose span says so and
/// whose `notifier.notice_held` signal names the hold's span; the accept's
/// release links to the held event's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_s_signal_and_its_release_stay_in_the_event_s_trace() {
    let (collector, endpoint) = Collector::start().await;
    let mut env = traced_env("trace-hold", &endpoint).await;
    env.set("NOTIFIER_LEDGER_URL", &common::ledger::ledger_url());
    env.set(
        "NOTIFIER_LEDGER_SCHEMA",
        &format!("t_trace_hold_{:08x}", fastrand::u32(..)),
    );
    env.set("WECHAT_TEMPLATE_ID", "tmpl-trace");
    env.declare().await;
    // The CRM's queue for the service's signals.
    let signals = format!("{}.signals", env.prefix);
    env.channel
        .queue_declare(
            signals.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    env.channel
        .queue_bind(
            signals.as_str().into(),
            env.exchange().as_str().into(),
            "notifier.notice_held".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let e1 = env.bulk(1, 1, false).remove(0);
    let user = e1["assignee"]["user_id"].as_str().unwrap().to_string();
    env.sim.push_fault(common::fault_for(
        &e1,
        FaultAction::FunctionErrcode(43101),
        Some(1),
    ));
    let replica = env.spawn_process();
    assert!(eventually(WAIT, || async { readyz(&replica.http).await.0 == 200 }).await);
    let (tp, trace, _) = traceparent(4242);
    publish_traced(
        &env,
        &[(e1.clone(), Some(AMQPValue::LongString(tp.as_str().into())))],
    )
    .await;

    let mut signal = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while signal.is_empty() && std::time::Instant::now() < deadline {
        signal = env.drain(&signals).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!signal.is_empty(), "notifier.notice_held published");
    assert!(
        eventually(WAIT, || async {
            collector
                .named("notice")
                .iter()
                .any(|s| attr(s, "notifier.outcome") == Some(AnyValue::StringValue("held".into())))
        })
        .await,
        "the held notice's span"
    );
    let held = collector
        .named("notice")
        .into_iter()
        .find(|s| attr(s, "notifier.outcome") == Some(AnyValue::StringValue("held".into())))
        .unwrap();
    assert_eq!(
        hex(&held.trace_id),
        trace,
        "one event: the notice continues its trace"
    );
    assert_eq!(
        header_str(&signal[0].1, "traceparent"),
        Some(format!("00-{trace}-{}-01", hex(&held.span_id))),
        "the signal names the hold's span"
    );

    // The accept releases it: a notice span linked to the held event's trace.
    let accept = serde_json::json!({
        "event_id": format!("{}-accept", env.prefix),
        "event_type": "subscription.changed",
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "user": {"user_id": user, "openid": format!("o-{user}")},
        "template_id": "tmpl-trace",
        "status": "accept",
    });
    env.channel
        .basic_publish(
            env.exchange().as_str().into(),
            "subscription.changed".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&accept).unwrap(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let id = e1["event_id"].as_str().unwrap().to_string();
    assert!(
        wait_until(WAIT, || env.notified_ids().contains(&id)).await,
        "released"
    );
    assert!(
        eventually(WAIT, || async {
            collector.named("notice").iter().any(|s| {
                attr(s, "notifier.released_events") == Some(AnyValue::IntValue(1))
                    && s.links.iter().any(|l| hex(&l.trace_id) == trace)
            })
        })
        .await,
        "the release's span links to the held event's trace: {:?}",
        collector.named("notice")
    );
    replica.sigterm();
    env.cleanup().await;
}

/// An attribute value as a short text, for the printed tree.
fn show(v: &AnyValue) -> String {
    match v {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::DoubleValue(d) => format!("{d:.3}"),
        AnyValue::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn show_attrs(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> String {
    attrs
        .iter()
        .map(|a| {
            let v = a.value.as_ref().and_then(|v| v.value.as_ref());
            format!("{}={}", a.key, v.map(show).unwrap_or_default())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The exported spans as an indented tree, trace by trace (the earliest
/// first): each span's name, kind, short ids, start (ms after the first
/// span) and length, its attributes, its events and its links. A span whose
/// parent was not exported here (the CRM's) is shown under that parent's id.
fn span_tree(spans: &[Span]) -> String {
    use std::fmt::Write as _;
    let short = |b: &[u8]| hex(b).chars().take(8).collect::<String>();
    let t0 = spans
        .iter()
        .map(|s| s.start_time_unix_nano)
        .min()
        .unwrap_or(0);
    let ms = |ns: u64| ns.saturating_sub(t0) as f64 / 1e6;
    let kind = |k: i32| match k {
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "internal",
    };
    let ids: BTreeSet<Vec<u8>> = spans.iter().map(|s| s.span_id.clone()).collect();
    let mut traces: Vec<Vec<u8>> = Vec::new();
    let mut by_start: Vec<&Span> = spans.iter().collect();
    by_start.sort_by_key(|s| s.start_time_unix_nano);
    for s in &by_start {
        if !traces.contains(&s.trace_id) {
            traces.push(s.trace_id.clone());
        }
    }
    fn walk(
        out: &mut String,
        all: &[&Span],
        span: &Span,
        depth: usize,
        line: &dyn Fn(&mut String, &Span, usize),
    ) {
        line(out, span, depth);
        for c in all.iter().filter(|c| c.parent_span_id == span.span_id) {
            walk(out, all, c, depth + 1, line);
        }
    }
    let line = |out: &mut String, s: &Span, depth: usize| {
        let pad = "    ".repeat(depth);
        let _ = writeln!(
            out,
            "{pad}└── {}  [{}]  span {}  at +{:.1} ms, {:.1} ms long",
            s.name,
            kind(s.kind),
            short(&s.span_id),
            ms(s.start_time_unix_nano),
            (s.end_time_unix_nano - s.start_time_unix_nano) as f64 / 1e6
        );
        if !s.attributes.is_empty() {
            let _ = writeln!(out, "{pad}      {}", show_attrs(&s.attributes));
        }
        for e in &s.events {
            let _ = writeln!(
                out,
                "{pad}      event at +{:.1} ms: {}  {}",
                ms(e.time_unix_nano),
                e.name,
                show_attrs(&e.attributes)
            );
        }
        for l in &s.links {
            let _ = writeln!(
                out,
                "{pad}      link → trace {} span {}",
                short(&l.trace_id),
                short(&l.span_id)
            );
        }
    };
    let mut out = String::new();
    for t in &traces {
        let in_trace: Vec<&Span> = by_start
            .iter()
            .copied()
            .filter(|s| &s.trace_id == t)
            .collect();
        let _ = writeln!(out, "trace {}", short(t));
        for root in in_trace
            .iter()
            .filter(|s| s.parent_span_id.is_empty() || !ids.contains(&s.parent_span_id))
        {
            if root.parent_span_id.is_empty() {
                walk(&mut out, &in_trace, root, 0, &line);
            } else {
                let _ = writeln!(
                    out,
                    "└── (span {}: the CRM's publish, not exported here)",
                    short(&root.parent_span_id)
                );
                walk(&mut out, &in_trace, root, 1, &line);
            }
        }
    }
    out
}

/// A bulk assignment (five customers to one salesperson, each event from its
/// own CRM trace) as a collector sees it: five receive spans, each a child
/// of its CRM span; one notice span linked to those five receive spans; the
/// WeChat call a client span under the notice; the notice's JSON log line
/// names the notice's trace; no access token, secret or name in any exported
/// byte. Prints the tree (`cargo test --test it bulk_assignment -- --nocapture`):
/// docs/design.md shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_assignment_s_span_tree() {
    const N: usize = 5;
    let (collector, endpoint) = Collector::start().await;
    let mut env = traced_env("trace-bulk", &endpoint).await;
    env.set("NOTIFIER_LOG_FORMAT", "json");
    // One notice for the five even when the full suite slows the publishes.
    env.set("NOTIFIER_BATCH_WINDOW_MS", "1000");
    env.declare().await;
    let log = std::env::temp_dir().join(format!("{}.log", env.prefix));
    let replica = env.spawn_process_logging(Some(&log));
    assert!(eventually(WAIT, || async { readyz(&replica.http).await.0 == 200 }).await);
    let events = env.bulk(N, 1, true);
    let mut crm = Vec::new();
    let mut published = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let (tp, trace, span) = traceparent(500 + i as u32);
        crm.push((trace, span));
        published.push((e.clone(), Some(AMQPValue::LongString(tp.as_str().into()))));
    }
    publish_traced(&env, &published).await;
    assert!(
        wait_until(WAIT, || env.notified_ids().len() == N).await,
        "every event delivered"
    );
    assert_eq!(
        env.sim.delivered().len(),
        1,
        "one notice for the assignment"
    );
    let receive = format!("{} receive", env.queue());
    assert!(
        eventually(WAIT, || async {
            collector.named(&receive).len() >= N
                && !collector.named("notice").is_empty()
                && !collector.named("POST").is_empty()
        })
        .await,
        "spans exported: {:?}",
        collector
            .spans()
            .iter()
            .map(|s| &s.name)
            .collect::<Vec<_>>()
    );
    let spans = collector.spans();
    println!(
        "the span tree of one bulk assignment ({N} events, one assignee), as exported:\n{}",
        span_tree(&spans)
    );
    assert_eq!(spans.len(), N + 2, "N receive spans, a notice, a call");

    // Each receive span: a consumer span, child of its CRM span, in the CRM's trace.
    let receives = collector.named(&receive);
    assert_eq!(receives.len(), N);
    for ((trace, span), e) in crm.iter().zip(&events) {
        let r = receives
            .iter()
            .find(|s| hex(&s.trace_id) == *trace)
            .unwrap_or_else(|| panic!("a receive span in the CRM trace {trace}"));
        assert_eq!(hex(&r.parent_span_id), *span, "child of the CRM's span");
        assert_eq!(r.kind, 5, "a consumer span");
        assert_eq!(
            attr(r, "messaging.message.id"),
            Some(AnyValue::StringValue(
                e["event_id"].as_str().unwrap().to_string()
            ))
        );
    }
    // One notice span: a root of its own trace, one link to each receive span.
    let notices = collector.named("notice");
    assert_eq!(notices.len(), 1);
    let notice = &notices[0];
    assert!(
        notice.parent_span_id.is_empty(),
        "a coalesced notice is a root"
    );
    let links: BTreeSet<(String, String)> = notice
        .links
        .iter()
        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
        .collect();
    let received: BTreeSet<(String, String)> = receives
        .iter()
        .map(|s| (hex(&s.trace_id), hex(&s.span_id)))
        .collect();
    assert_eq!(notice.links.len(), N);
    assert_eq!(links, received, "a link to each event's receive span");
    assert_eq!(
        attr(notice, "notifier.event_count"),
        Some(AnyValue::IntValue(N as i64))
    );
    assert_eq!(
        attr(notice, "notifier.outcome"),
        Some(AnyValue::StringValue("accepted".into()))
    );
    assert_eq!(
        attr(notice, "notifier.links_dropped"),
        Some(AnyValue::IntValue(0))
    );
    // The WeChat call: a client span, the notice's child.
    let posts = collector.named("POST");
    assert_eq!(posts.len(), 1);
    let post = &posts[0];
    assert_eq!(post.kind, 3);
    assert_eq!(post.trace_id, notice.trace_id);
    assert_eq!(post.parent_span_id, notice.span_id);
    // The notice's log line leads to its trace, and names every event.
    let delivered: Value = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "notice delivered")
        .expect("a JSON line for the notice");
    assert_eq!(delivered["trace_id"], hex(&notice.trace_id).as_str());
    assert_eq!(delivered["span_id"], hex(&notice.span_id).as_str());
    for e in &events {
        assert!(delivered["event_ids"]
            .as_str()
            .unwrap()
            .contains(e["event_id"].as_str().unwrap()));
    }
    assert_nothing_secret(&collector.bytes(), &env, &events);
    replica.sigterm();
    let _ = std::fs::remove_file(&log);
    env.cleanup().await;
}
