//! `GET /metrics`: Prometheus text exposition (format 0.0.4). Every name carries the `adaptd_`
//! prefix. Rendered on each scrape from the counters the components already keep; nothing here
//! is on a request's path.

use std::fmt::Write as _;

use super::Api;
use crate::engine::{Health, Histogram};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    let (buckets, sum) = h.snapshot();
    for (le, count) in &buckets {
        let le = if le.is_infinite() { "+Inf".to_string() } else { le.to_string() };
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {}", buckets.last().map_or(0, |b| b.1));
}

pub fn render(api: &Api) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let engine = api.engine();
    let stats = engine.stats();

    family(&mut out, "adaptd_engine_ready", "gauge", "1 when the serving engine has warmed up and answers.");
    let _ = writeln!(out, "adaptd_engine_ready {}", i32::from(matches!(&*engine.health().borrow(), Health::Ready { .. })));
    family(&mut out, "adaptd_inference_rows_total", "counter", "Rows (samples) the engine has served.");
    let _ = writeln!(out, "adaptd_inference_rows_total {}", stats.rows.load(Relaxed));
    family(&mut out, "adaptd_inference_batches_total", "counter", "Graph calls the engine has made.");
    let _ = writeln!(out, "adaptd_inference_batches_total {}", stats.batches.load(Relaxed));
    family(&mut out, "adaptd_inference_inline_total", "counter", "Requests run on their caller's thread because the engine was idle.");
    let _ = writeln!(out, "adaptd_inference_inline_total {}", stats.inline.load(Relaxed));
    family(&mut out, "adaptd_engine_merged_sessions", "gauge", "LoRA adapters serving merged into a copy of the model (engine.merged_sessions at most).");
    let _ = writeln!(out, "adaptd_engine_merged_sessions {}", stats.merged_sessions.load(Relaxed));
    histogram(&mut out, "adaptd_request_latency_seconds", "Inference latency per request, queue and run.", &stats.latency);
    histogram(&mut out, "adaptd_batch_size", "Rows per graph call (micro-batching).", &stats.batch_rows);
    family(&mut out, "adaptd_requests_refused_total", "counter", "Inference requests refused, by reason.");
    for (reason, n) in api.refused() {
        let _ = writeln!(out, "adaptd_requests_refused_total{{reason=\"{}\"}} {n}", label(reason));
    }

    if let Some(requests) = api.label_requests() {
        let figures = requests.figures();
        family(&mut out, "adaptd_label_requests_published_total", "counter", "Label requests published since the daemon started.");
        for (task, (published, _)) in &figures {
            let _ = writeln!(out, "adaptd_label_requests_published_total{{task=\"{}\"}} {published}", label(task));
        }
        family(
            &mut out,
            "adaptd_label_requests",
            "gauge",
            "The task's label requests kept (not expired), by state: answered, disagreed (the answer says serving was wrong), pending.",
        );
        for (task, (_, counts)) in &figures {
            for (state, n) in [("answered", counts.answered), ("disagreed", counts.disagreed), ("pending", counts.pending)] {
                let _ = writeln!(out, "adaptd_label_requests{{task=\"{}\",state=\"{state}\"}} {n}", label(task));
            }
        }
    }

    let connections = api.connections();
    family(&mut out, "adaptd_http_connections", "gauge", "HTTP connections open now.");
    let _ = writeln!(out, "adaptd_http_connections {}", connections.open.load(Relaxed));
    family(&mut out, "adaptd_http_connections_refused_total", "counter", "HTTP connections closed at once for being past http.max_connections.");
    let _ = writeln!(out, "adaptd_http_connections_refused_total {}", connections.refused.load(Relaxed));
    family(&mut out, "adaptd_http_body_timeouts_total", "counter", "HTTP requests whose body did not arrive within http.body_timeout_s.");
    let _ = writeln!(out, "adaptd_http_body_timeouts_total {}", connections.body_timeouts.load(Relaxed));

    if let Some(link) = api.link_status() {
        family(&mut out, "adaptd_mqtt_connected", "gauge", "1 while the MQTT link (samples, commands, events) is connected.");
        let _ = writeln!(out, "adaptd_mqtt_connected {}", i32::from(link.connected.load(Relaxed)));
        family(&mut out, "adaptd_mqtt_connections_total", "counter", "Connections the MQTT link has made (1 plus its reconnects).");
        let _ = writeln!(out, "adaptd_mqtt_connections_total {}", link.connections.load(Relaxed));
        family(&mut out, "adaptd_mqtt_unrouted_total", "counter", "Messages no subscription wanted (acknowledged and dropped).");
        let _ = writeln!(out, "adaptd_mqtt_unrouted_total {}", link.unrouted.load(Relaxed));
    }
    if let Some(ingest) = api.ingest_stats() {
        family(&mut out, "adaptd_ingest_connected", "gauge", "1 while ingest is subscribed to the samples topic.");
        let _ = writeln!(out, "adaptd_ingest_connected {}", i32::from(ingest.connected.load(Relaxed)));
        family(&mut out, "adaptd_samples_ingested_total", "counter", "Labelled samples stored durably (then acked).");
        let _ = writeln!(out, "adaptd_samples_ingested_total {}", ingest.stored.load(Relaxed));
        family(&mut out, "adaptd_samples_duplicate_total", "counter", "Samples whose idempotency key was already stored.");
        let _ = writeln!(out, "adaptd_samples_duplicate_total {}", ingest.duplicates.load(Relaxed));
        family(
            &mut out,
            "adaptd_samples_redelivered_total",
            "counter",
            "Messages the broker delivered again after a reconnect, already stored or refused (counted once, here).",
        );
        let _ = writeln!(out, "adaptd_samples_redelivered_total {}", ingest.redelivered.load(Relaxed));
        family(&mut out, "adaptd_samples_refused_total", "counter", "Samples refused (and acked), by reason.");
        for (reason, n) in ingest.refused() {
            let _ = writeln!(out, "adaptd_samples_refused_total{{reason=\"{}\"}} {n}", label(reason));
        }
    }

    let parts = api.parts().snapshot();
    if !parts.is_empty() {
        family(&mut out, "adaptd_part_up", "gauge", "1 while a long-running part (loop:<task>, ingest) runs; 0 while it waits to be restarted after an error.");
        for (part, state) in &parts {
            let _ = writeln!(out, "adaptd_part_up{{part=\"{}\"}} {}", label(part), i32::from(state.up));
        }
        family(&mut out, "adaptd_part_restarts_total", "counter", "Times a part was restarted after it stopped on an error or a panic.");
        for (part, state) in &parts {
            let _ = writeln!(out, "adaptd_part_restarts_total{{part=\"{}\"}} {}", label(part), state.restarts);
        }
    }

    let statuses = api.statuses();
    family(&mut out, "adaptd_adapter_active_version", "gauge", "Adapter version serving each task (0: the base model).");
    for s in &statuses {
        let _ = writeln!(out, "adaptd_adapter_active_version{{task=\"{}\"}} {}", label(&s.task), s.serving_version);
    }
    family(&mut out, "adaptd_samples_stored", "gauge", "Labelled samples in the store, per task.");
    for s in &statuses {
        let _ = writeln!(out, "adaptd_samples_stored{{task=\"{}\"}} {}", label(&s.task), s.samples);
    }
    family(&mut out, "adaptd_training_jobs_total", "counter", "Training jobs per task, by outcome (started, promoted, rejected, deferred, failed).");
    for s in &statuses {
        for (outcome, n) in &s.jobs {
            let _ = writeln!(out, "adaptd_training_jobs_total{{task=\"{}\",outcome=\"{}\"}} {n}", label(&s.task), label(outcome));
        }
    }

    if let Some(reading) = api.device_reading() {
        family(&mut out, "adaptd_device_cpu_percent", "gauge", "Whole-device CPU load.");
        let _ = writeln!(out, "adaptd_device_cpu_percent {}", reading.cpu_percent);
        family(&mut out, "adaptd_device_memory_available_bytes", "gauge", "Memory available to new work (on Jetson, shared with the GPU).");
        let _ = writeln!(out, "adaptd_device_memory_available_bytes {}", reading.available_mb.saturating_mul(1 << 20));
        family(&mut out, "adaptd_device_memory_total_bytes", "gauge", "Device memory.");
        let _ = writeln!(out, "adaptd_device_memory_total_bytes {}", reading.total_mb.saturating_mul(1 << 20));
        family(&mut out, "adaptd_device_temperature_celsius", "gauge", "Thermal zones' temperatures.");
        for (zone, c) in &reading.temperatures_c {
            let _ = writeln!(out, "adaptd_device_temperature_celsius{{zone=\"{}\"}} {c}", label(zone));
        }
        if let Some(gpu) = reading.gpu_percent {
            family(&mut out, "adaptd_device_gpu_percent", "gauge", "GPU load (Jetson).");
            let _ = writeln!(out, "adaptd_device_gpu_percent {gpu}");
        }
    }
    out
}
