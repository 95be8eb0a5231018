//! The HTML report: what the adaptation loop did, drawn from the per-task journal. Accuracy per
//! adapter version, loss curves, per-class recall and every gate decision with its figures.
//! One self-contained file (inline SVG, no scripts, no network), so it opens on an air-gapped
//! laptop as well as it does on the device.

use std::fmt::Write as _;
use std::path::Path;

use adaptd_protocol::event::JobRecord;
use adaptd_protocol::{Event, EventRecord};

use adaptd_daemon::events::Journal;

/// A named line on a chart: `(x, y)` points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Accuracy that someone measured outside the gate (the demo's fixed evaluation sets), per
/// adapter version; drawn next to the gate's holdout figures.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub title: String,
    pub series: Vec<Series>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("journal of task {task:?}: {source}")]
    Journal { task: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error(transparent)]
    Write(#[from] adaptd_adapters::fsutil::FsError),
}

/// One task's journal, read.
#[derive(Debug, Clone)]
pub struct TaskHistory {
    pub task: String,
    pub records: Vec<EventRecord>,
    pub unreadable_lines: usize,
}

impl TaskHistory {
    pub fn read(journal: &Journal, task: &str) -> Result<TaskHistory, ReportError> {
        let (records, unreadable_lines) = journal.read(task).map_err(|source| ReportError::Journal { task: task.into(), source })?;
        Ok(TaskHistory { task: task.into(), records, unreadable_lines })
    }

    /// Every training job that reached the gate, oldest first.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRecord> {
        self.records.iter().filter_map(|r| match &r.event {
            Event::Job(job) => Some(job),
            _ => None,
        })
    }
}

/// Tasks that have a journal under `state_dir`, sorted.
pub fn journal_tasks(state_dir: &Path) -> Vec<String> {
    let mut tasks: Vec<String> = std::fs::read_dir(state_dir.join("journal"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".jsonl").map(str::to_string))
        .collect();
    tasks.sort();
    tasks
}

/// Write the report for `histories` to `out` atomically (write, fsync, rename).
pub fn write(out: &Path, title: &str, histories: &[TaskHistory], measured: Option<&Measured>) -> Result<(), ReportError> {
    let html = render(title, histories, measured);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Dir { path: dir.display().to_string(), source })?;
    }
    Ok(adaptd_adapters::fsutil::write_atomic(out, html.as_bytes())?)
}

pub fn render(title: &str, histories: &[TaskHistory], measured: Option<&Measured>) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head><body>\n<h1>{t}</h1>\n",
        t = escape(title)
    );
    if let Some(m) = measured.filter(|m| !m.series.is_empty()) {
        let _ = write!(html, "<h2>{}</h2>\n{}", escape(&m.title), line_chart("adapter version", "accuracy", &m.series, Some((0.0, 1.0)), true));
    }
    for h in histories {
        task_section(&mut html, h);
    }
    if histories.is_empty() {
        html.push_str("<p>No task has a journal yet: no training job has reached the gate.</p>\n");
    }
    html.push_str("</body></html>\n");
    html
}

/// The fleet page: what `fleet learn` did, from its state directory's report and rollouts. Per
/// device, how each round's release scored on its own holdout (the shadow score) and what the
/// adapter it trained on from it reached; per round, the offers combined (weights, residual);
/// and every rollout's table.
pub fn render_fleet(title: &str, learned: &adaptd_daemon::fleet::learn::LearnReport, rollouts: &[(String, adaptd_fleet::controller::Rollout)]) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head><body>\n<h1>{t}</h1>\n",
        t = escape(title)
    );
    let mut devices: Vec<&str> = learned.rounds.iter().flat_map(|r| r.devices.iter().map(|d| d.device.as_str())).collect();
    devices.sort_unstable();
    devices.dedup();
    let series = |pick: fn(&adaptd_daemon::fleet::learn::DeviceRound) -> Option<f64>,
                  x_of: fn(&adaptd_daemon::fleet::learn::RoundReport) -> Option<u64>|
     -> Vec<Series> {
        devices
            .iter()
            .map(|name| Series {
                name: name.to_string(),
                points: learned.rounds.iter().filter_map(|r| Some((x_of(r)? as f64, pick(r.devices.iter().find(|d| d.device == *name)?)?))).collect(),
            })
            .collect()
    };
    let _ = write!(
        html,
        "<h2>Each round's release on each device's own holdout (its shadow score)</h2>\n{}",
        line_chart("release", "accuracy", &series(|d| d.release_accuracy, |r| r.parent), Some((0.0, 1.0)), true)
    );
    let _ = write!(
        html,
        "<h2>What each device reached training on from it (its offer)</h2>\n{}",
        line_chart("release trained from", "accuracy", &series(|d| d.offered_accuracy, |r| r.parent), Some((0.0, 1.0)), true)
    );
    html.push_str(
        "<h2>Rounds</h2>\n<table><tr><th>round</th><th>from</th><th>release</th><th>rule</th><th>residual</th><th>offers (device v: weight)</th></tr>\n",
    );
    for r in &learned.rounds {
        let offers: Vec<String> = r.offers.iter().map(|o| format!("{} v{}: {:.3}", escape(&o.device), o.version, o.weight)).collect();
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{}</td></tr>",
            r.round,
            r.parent.map_or("base".to_string(), |p| p.to_string()),
            r.release,
            escape(&r.rule),
            r.residual,
            offers.join(", ")
        );
    }
    html.push_str("</table>\n");
    for (name, rollout) in rollouts {
        let _ = write!(html, "<h2>Rollout {}</h2>\n<pre>{}</pre>\n", escape(name), escape(&rollout.table()));
    }
    if learned.rounds.is_empty() {
        html.push_str("<p>No round has finished yet.</p>\n");
    }
    html.push_str("</body></html>\n");
    html
}

fn task_section(html: &mut String, h: &TaskHistory) {
    let _ = writeln!(html, "<h2>Task <code>{}</code></h2>", escape(&h.task));
    let jobs: Vec<&JobRecord> = h.jobs().collect();
    if jobs.is_empty() {
        html.push_str("<p>No training job has reached the gate yet.</p>\n");
    }
    if h.unreadable_lines > 0 {
        let _ = writeln!(html, "<p class=\"warn\">{} unreadable journal line(s) skipped.</p>", h.unreadable_lines);
    }
    if !jobs.is_empty() {
        let series_of = |name: &str, pick: &dyn Fn(&JobRecord) -> Option<f64>| Series {
            name: name.into(),
            points: jobs.iter().filter_map(|j| Some((j.version as f64, pick(j)?))).collect(),
        };
        let accuracy = [
            series_of("candidate, holdout", &|j| Some(j.evidence.candidate.accuracy)),
            series_of("incumbent, holdout", &|j| Some(j.evidence.incumbent.accuracy)),
            series_of("candidate, base-domain retention", &|j| j.evidence.retention.map(|(_, after)| after)),
        ];
        let accuracy: Vec<Series> = accuracy.into_iter().filter(|s| !s.points.is_empty()).collect();
        html.push_str("<h3>Accuracy per adapter version (gate figures on samples the trainer never saw)</h3>\n");
        html.push_str(&line_chart("candidate version", "accuracy", &accuracy, Some((0.0, 1.0)), true));

        let finite = |v: f32| v.is_finite().then_some(v as f64);
        let steps: Vec<Series> = jobs
            .iter()
            .map(|j| Series {
                name: format!("v{}", j.version),
                points: j.training.losses.iter().enumerate().filter_map(|(i, &l)| Some((i as f64 + 1.0, finite(l)?))).collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        let epochs: Vec<Series> = jobs
            .iter()
            .map(|j| Series {
                name: format!("v{}", j.version),
                points: j.training.epochs.iter().filter_map(|e| Some((e.epoch as f64 + 1.0, finite(e.val_loss)?))).collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        html.push_str("<div class=\"row\"><div>\n<h3>Training loss per step</h3>\n");
        html.push_str(&line_chart("step", "loss", &steps, None, false));
        html.push_str("</div><div>\n<h3>Validation loss per epoch</h3>\n");
        html.push_str(&line_chart("epoch", "loss", &epochs, None, true));
        html.push_str("</div></div>\n");

        if let Some(last) = jobs.iter().rev().find(|j| j.promote).or(jobs.last()) {
            let recall = |m: &adaptd_daemon::gate::Metrics| -> Vec<(String, f64)> { m.per_class.iter().map(|(k, c)| (k.clone(), c.recall)).collect() };
            let _ = writeln!(html, "<h3>Per-class recall on the holdout: v{} against v{}</h3>", last.version, last.incumbent_version);
            html.push_str(&bar_chart(&[
                (format!("v{} (incumbent)", last.incumbent_version), recall(&last.evidence.incumbent)),
                (format!("v{} (candidate)", last.version), recall(&last.evidence.candidate)),
            ]));
        }
    }
    decisions_table(html, h);
}

/// One row of the decisions table.
struct Row {
    what: String,
    class: &'static str,
    version: String,
    trigger: String,
    accuracy: String,
    retention: String,
    training: String,
    why: String,
}

fn row(event: &Event) -> Row {
    let pct = |v: f64| format!("{:.1} %", 100.0 * v);
    let version = event.version().map(|v| format!("v{v}")).unwrap_or_default();
    let plain = |what: String, class, why: String| Row {
        what,
        class,
        version: version.clone(),
        trigger: String::new(),
        accuracy: String::new(),
        retention: String::new(),
        training: String::new(),
        why,
    };
    match event {
        Event::Job(j) => Row {
            what: if j.promote { "promoted" } else { "rejected" }.into(),
            class: if j.promote { "ok" } else { "no" },
            version,
            trigger: serde_json::to_value(j.trigger).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            accuracy: format!("{} → {}", pct(j.evidence.incumbent.accuracy), pct(j.evidence.candidate.accuracy)),
            retention: j.evidence.retention.map(|(before, after)| format!("{} → {}", pct(before), pct(after))).unwrap_or_else(|| "–".into()),
            training: format!("{} on {} samples, {} epochs in {:.1} s", j.kind, j.samples.train, j.training.epochs.len(), j.training.seconds),
            why: j.summary.clone(),
        },
        Event::RolledBack { from_version, to_version, reason, .. } => {
            Row { version: format!("v{from_version} → v{to_version}"), ..plain("rolled back".into(), "warn", reason.clone()) }
        }
        // A step of an escalating job: information, not a refusal.
        Event::TrainingAttempt { kind, seconds, reason, .. } => {
            Row { training: format!("{kind} in {seconds:.1} s"), ..plain("training step".into(), "step", reason.clone()) }
        }
        Event::TrainingFailed { reason, .. } | Event::TrainingCancelled { reason, .. } | Event::TrainingDeferred { reason } => {
            plain(event.kind().replace('_', " "), "no", reason.clone())
        }
        Event::Promoted { reason, .. } => plain("promoted".into(), "ok", reason.clone().unwrap_or_default()),
        // The end of a job that escalated: what it promoted, step by step, and in how long.
        Event::JobFinished { outcome, promoted, seconds, summary, .. } => Row {
            training: format!("job over in {seconds:.1} s"),
            version: promoted.iter().map(|v| format!("v{v}")).collect::<Vec<_>>().join(", "),
            ..plain(format!("job {outcome}"), if promoted.is_empty() { "step" } else { "ok" }, summary.clone())
        },
        Event::LabelsSuspected { judged, suspects, sources, .. } => {
            let named: Vec<String> = sources.iter().map(|s| format!("{} ({} of {})", s.source, s.suspects, s.samples)).collect();
            let why = format!(
                "{suspects} of {judged} samples have labels their neighbours or an adapter doubt: kept out of training (those the neighbours doubt, out of the holdout too) until judged{}",
                if named.is_empty() { String::new() } else { format!("; often suspected: {}", named.join(", ")) }
            );
            plain("labels suspected".into(), "warn", why)
        }
        Event::LabelRequestsAnswered { published, sent, answered, disagreed, pending } => plain(
            "label requests answered".into(),
            "step",
            format!(
                "{answered} of {sent} requests kept answered, {disagreed} of them saying serving was wrong; {pending} pending; {published} published since start"
            ),
        ),
        other => plain(other.kind().replace('_', " "), "no", String::new()),
    }
}

fn decisions_table(html: &mut String, h: &TaskHistory) {
    if h.records.is_empty() {
        return;
    }
    html.push_str("<h3>Decisions</h3>\n<table><tr><th>when (UTC)</th><th>what</th><th>version</th><th>trigger</th><th>holdout accuracy</th><th>retention</th><th>training</th><th>why</th></tr>\n");
    for r in &h.records {
        let Row { what, class, version, trigger, accuracy, retention, training, why } = row(&r.event);
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&format_utc(r.time_ms)),
            escape(&what),
            escape(&version),
            escape(&trigger),
            escape(&accuracy),
            escape(&retention),
            escape(&training),
            escape(&why)
        );
    }
    html.push_str("</table>\n");
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}\
h2{border-bottom:1px solid #ccc;padding-bottom:.2em}table{border-collapse:collapse;font-size:.9em}\
td,th{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}\
.ok{color:#1a7f37;font-weight:600}.no{color:#b42318;font-weight:600}.warn{color:#9a6700;font-weight:600}.step{color:#57606a}\
.row{display:flex;gap:2em;flex-wrap:wrap}svg{background:#fff}";

const COLORS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
const WIDTH: f64 = 520.0;
const HEIGHT: f64 = 300.0;
const MARGIN: (f64, f64, f64, f64) = (50.0, 20.0, 20.0, 40.0); // left, right, top, bottom

/// An SVG line chart; `y_range` fixes the axis (accuracy), otherwise it fits the data.
pub fn line_chart(x_label: &str, y_label: &str, series: &[Series], y_range: Option<(f64, f64)>, markers: bool) -> String {
    let points = series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        return "<p>(no data)</p>\n".into();
    }
    if let Some((lo, hi)) = y_range {
        (y0, y1) = (lo.min(y0), hi.max(y1));
    } else {
        y0 = y0.min(0.0);
    }
    if x1 == x0 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    if y1 == y0 {
        y1 = y0 + 1.0;
    }
    let (l, r, t, b) = MARGIN;
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (WIDTH - l - r);
    let sy = |y: f64| HEIGHT - b - (y - y0) / (y1 - y0) * (HEIGHT - t - b);
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{}\" font-size=\"11\">\n", HEIGHT + 18.0 * series.len() as f64);
    y_grid(&mut svg, (y0, y1), sy);
    // Versions, steps and epochs are whole numbers: tick them as such.
    let whole = series.iter().flat_map(|s| s.points.iter()).all(|(x, _)| x.fract() == 0.0);
    let x_ticks: Vec<f64> = if whole {
        let step = ((x1 - x0) / 6.0).ceil().max(1.0);
        (0..).map(|i| x0.ceil() + step * i as f64).take_while(|&x| x <= x1).collect()
    } else {
        (0..=4).map(|i| x0 + (x1 - x0) * i as f64 / 4.0).collect()
    };
    for x in x_ticks {
        let _ = writeln!(svg, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>", sx(x), HEIGHT - b + 14.0, tick(x));
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{l}\" x2=\"{l}\" y1=\"{t}\" y2=\"{}\" stroke=\"#444\"/><line x1=\"{l}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#444\"/>\
<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text><text x=\"12\" y=\"{}\" transform=\"rotate(-90 12 {})\" text-anchor=\"middle\">{}</text>",
        HEIGHT - b,
        WIDTH - r,
        (l + WIDTH - r) / 2.0,
        HEIGHT - b + 30.0,
        escape(x_label),
        (t + HEIGHT - b) / 2.0,
        (t + HEIGHT - b) / 2.0,
        escape(y_label),
        y = HEIGHT - b
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = writeln!(svg, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.8\" points=\"{}\"/>", path.join(" "));
        if markers {
            for &(x, y) in s.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()) {
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"><title>{}: {}</title></circle>",
                    sx(x),
                    sy(y),
                    escape(&s.name),
                    tick(y)
                );
            }
        }
        let ly = HEIGHT + 18.0 * i as f64 + 4.0;
        let _ = writeln!(
            svg,
            "<rect x=\"{l}\" y=\"{ly}\" width=\"12\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            l + 18.0,
            ly + 9.0,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Five horizontal grid lines from `y0` to `y1`, labelled on the left; `sy` maps a value to its pixel row.
fn y_grid(svg: &mut String, (y0, y1): (f64, f64), sy: impl Fn(f64) -> f64) {
    let (l, r, _, _) = MARGIN;
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let py = sy(y);
        let _ = writeln!(
            svg,
            "<line x1=\"{l}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - r,
            l - 4.0,
            py + 4.0,
            tick(y)
        );
    }
}

/// An SVG grouped bar chart of values in [0, 1] per category, one bar per group.
pub fn bar_chart(groups: &[(String, Vec<(String, f64)>)]) -> String {
    let mut categories: Vec<&str> = groups.iter().flat_map(|(_, v)| v.iter().map(|(c, _)| c.as_str())).collect();
    categories.sort_by(|a, b| a.parse::<f64>().ok().zip(b.parse::<f64>().ok()).map_or_else(|| a.cmp(b), |(x, y)| x.total_cmp(&y)));
    categories.dedup();
    if categories.is_empty() {
        return "<p>(no data)</p>\n".into();
    }
    let (l, r, t, b) = MARGIN;
    let slot = (WIDTH - l - r) / categories.len() as f64;
    let bar = (slot * 0.8) / groups.len().max(1) as f64;
    let sy = |y: f64| HEIGHT - b - y.clamp(0.0, 1.0) * (HEIGHT - t - b);
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{}\" font-size=\"11\">\n", HEIGHT + 18.0 * groups.len() as f64);
    y_grid(&mut svg, (0.0, 1.0), sy);
    for (ci, cat) in categories.iter().enumerate() {
        let x = l + slot * ci as f64 + slot * 0.1;
        for (gi, (name, values)) in groups.iter().enumerate() {
            if let Some((_, v)) = values.iter().find(|(c, _)| c == cat) {
                let _ = writeln!(
                    svg,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {}: {}</title></rect>",
                    x + bar * gi as f64,
                    sy(*v),
                    bar,
                    HEIGHT - b - sy(*v),
                    COLORS[gi % COLORS.len()],
                    escape(name),
                    escape(cat),
                    tick(*v)
                );
            }
        }
        let _ = writeln!(svg, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>", l + slot * (ci as f64 + 0.5), HEIGHT - b + 14.0, escape(cat));
    }
    let _ = writeln!(svg, "<line x1=\"{l}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#444\"/>", WIDTH - r, y = HEIGHT - b);
    for (gi, (name, _)) in groups.iter().enumerate() {
        let ly = HEIGHT + 18.0 * gi as f64 - 10.0;
        let _ = writeln!(
            svg,
            "<rect x=\"{l}\" y=\"{ly}\" width=\"12\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            COLORS[gi % COLORS.len()],
            l + 18.0,
            ly + 9.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn tick(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `YYYY-MM-DD HH:MM:SS` for milliseconds since the epoch (civil-from-days, proleptic Gregorian).
fn format_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn utc_dates_are_civil() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(1_795_000_000_000), "2026-11-18 11:06:40");
    }

    #[test]
    fn the_report_draws_every_job_and_decision() {
        // As the journal holds them: JSON lines.
        let job = |v: u64, promote: bool, acc: f64| {
            let class = |recall: f64| json!({ "precision": 1.0, "recall": recall, "f1": 0.5, "support": 10 });
            let metrics =
                |acc: f64, r0: f64, r1: f64| json!({ "accuracy": acc, "macro_f1": acc, "samples": 20, "per_class": { "0": class(r0), "1": class(r1) } });
            json!({ "event": "job", "task": "sorter", "version": v, "incumbent_version": v - 1, "kind": "lora", "trigger": "new_samples", "promote": promote,
                "summary": if promote { "promoted" } else { "rejected: <worse>" }, "time_ms": 1_795_000_000_000u64, "checks": [], "notes": [],
                "evidence": { "candidate": metrics(acc, 0.9, 0.8), "incumbent": metrics(0.3, 0.2, 0.4), "retention": [0.99, 0.9], "finite": true, "probe_change": 0.5, "parity_max_diff": 0.0 },
                "samples": { "train": 200, "validation": 20, "holdout": 20 },
                "training": { "losses": [2.0, 1.0, 0.5], "epochs": [{ "epoch": 0, "train_loss": 1.5, "val_loss": 1.2, "val_accuracy": 0.5, "seconds": 0.1 }, { "epoch": 1, "train_loss": 0.9, "val_loss": 0.7, "val_accuracy": 0.7, "seconds": 0.1 }],
                              "seconds": 2.5, "best_epoch": 1, "stopped_early": false, "steps": 30, "batch_size": 16 } })
        };
        let rolled_back =
            json!({ "event": "rolled_back", "task": "sorter", "from_version": 1, "to_version": 0, "reason": "operator", "by": "http", "time_ms": 0 });
        let suspected = json!({ "event": "labels_suspected", "task": "sorter", "time_ms": 0, "judged": 400, "suspects": 31, "new": 31,
            "by_label": { "3": 31 }, "sources": [{ "source": "line-9", "samples": 60, "suspects": 28 }] });
        let answered = json!({ "event": "label_requests_answered", "task": "sorter", "time_ms": 0, "published": 12, "sent": 10, "answered": 4, "disagreed": 3, "pending": 6 });
        let records =
            [job(1, true, 0.9), job(2, false, 0.85), rolled_back, suspected, answered].into_iter().map(|v| serde_json::from_value(v).unwrap()).collect();
        let history = TaskHistory { task: "sorter".into(), records, unreadable_lines: 1 };
        let measured = Measured { title: "demo".into(), series: vec![Series { name: "rotated".into(), points: vec![(0.0, 0.2), (1.0, 0.9)] }] };
        let html = render("adaptd <report>", &[history], Some(&measured));
        assert!(html.contains("<title>adaptd &lt;report&gt;</title>"), "titles are escaped");
        assert_eq!(html.matches("<svg").count(), 5, "measured, accuracy, step loss, epoch loss, per-class");
        assert!(html.contains("rejected: &lt;worse&gt;") && html.contains("rolled back") && html.contains("90.0 %"));
        assert!(html.contains("1 unreadable journal line"));
        assert!(
            html.contains("31 of 400 samples have labels their neighbours or an adapter doubt") && html.contains("line-9 (28 of 60)"),
            "suspects and who sent them"
        );
        assert!(html.contains("4 of 10 requests kept answered, 3 of them saying serving was wrong"));
        assert!(html.contains("v1 (candidate)"), "per-class bars compare the last promoted version");
        let empty = render("r", &[], None);
        assert!(empty.contains("No task has a journal yet") && !empty.contains("<svg"));
    }
}
