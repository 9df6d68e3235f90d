//! The `arvados_dispatchcloud_*` metrics: gathered from the core's public getters, plus the
//! cloud driver's own families ([`append_families`]; EC2's per-subnet instance gauge and start
//! counter), written in the Prometheus text format 0.0.4 (`/metrics`) or as a JSON export
//! (`/metrics.json`).
//!
//! Invariants (reference-scheduler.md §6, reference-workers.md §8, crates.md §3.5): names, types,
//! label names and label values are Go's; counters carry no `_total` suffix; summaries export the
//! quantiles 0.5, 0.9, 0.95 and 0.99 plus `_sum` and `_count`; every label combination Go
//! pre-creates is present at 0 (boot outcomes, disappearances, driver operations, every
//! category of every configured type, every category of the price and size gauges). Families are
//! sorted by name and samples by their label values, as Go's registry gathers them. The encoder
//! is hand-written: no metrics crate renames counters or computes summary quantiles the Go way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::core::Dispatcher;
use crate::core::metrics::{BootOutcome, DRIVER_OPERATIONS, QUANTILES, Summary};
use crate::core::pool::worker::Worker;
use crate::core::time::Timestamp;
use crate::core::types::{IdleBehavior, WorkerState};

/// The prefix of every metric name here.
pub const PREFIX: &str = "arvados_dispatchcloud_";

/// The `Content-Type` of the text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The worker categories of `instances_total`, `instances_price`, `vcpus_total` and
/// `memory_bytes_total`, in Go's order.
pub const CATEGORIES: [&str; 5] = ["inuse", "hold", "booting", "unknown", "idle"];

/// A metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A monotonic counter.
    Counter,
    /// A gauge.
    Gauge,
    /// A summary with quantiles.
    Summary,
}

impl Kind {
    /// The text-format spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
        }
    }

    /// The `io.prometheus.client.MetricType` number, for the JSON export.
    fn proto_number(self) -> u8 {
        match self {
            Kind::Counter => 0,
            Kind::Gauge => 1,
            Kind::Summary => 2,
        }
    }
}

/// The value of one sample.
#[derive(Clone, Debug, PartialEq)]
pub enum SampleValue {
    /// A counter or gauge value.
    Scalar(f64),
    /// A summary: `(quantile, value)` pairs, the sum and the count.
    Summary {
        /// Quantile values (NaN when there were no recent observations).
        quantiles: Vec<(f64, f64)>,
        /// Sum of all observations.
        sum: f64,
        /// Number of observations.
        count: u64,
    },
}

/// One labelled series of a family.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Label names and values, in the family's label order.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: SampleValue,
}

/// One metric family.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// Full name, with [`PREFIX`].
    pub name: String,
    /// Help text.
    pub help: &'static str,
    /// Type.
    pub kind: Kind,
    /// Series, sorted by label values.
    pub samples: Vec<Sample>,
}

/// Label values seen by earlier scrapes, so that a series that has gone to zero is still
/// exported at 0 (Go keeps a gauge vector's series once created).
#[derive(Clone, Debug, Default)]
pub struct LabelMemory {
    queue_entries: BTreeSet<(String, String)>,
    instance_types: BTreeSet<String>,
}

/// A family builder.
struct Builder {
    families: Vec<Family>,
}

impl Builder {
    fn family(&mut self, name: &str, help: &'static str, kind: Kind) -> &mut Family {
        self.families.push(Family {
            name: format!("{PREFIX}{name}"),
            help,
            kind,
            samples: Vec::new(),
        });
        self.families.last_mut().expect("just pushed")
    }

    fn scalar(&mut self, name: &str, help: &'static str, kind: Kind, v: f64) {
        self.family(name, help, kind).samples.push(Sample {
            labels: Vec::new(),
            value: SampleValue::Scalar(v),
        });
    }
}

fn summary_value(s: &Summary, now: Timestamp) -> SampleValue {
    SampleValue::Summary {
        quantiles: QUANTILES
            .iter()
            .map(|q| (*q, s.quantile(now, *q)))
            .collect(),
        sum: s.sum,
        count: s.count,
    }
}

/// Go's category rule for a worker (reference-workers.md §8): `inuse` if it has runners, then
/// `hold`, `booting`, `unknown`, otherwise `idle` (so `shutdown` counts as idle).
pub fn category(w: &Worker) -> &'static str {
    if w.runner_count() > 0 {
        "inuse"
    } else if w.idle_behavior == IdleBehavior::Hold {
        "hold"
    } else if w.state == WorkerState::Booting {
        "booting"
    } else if w.state == WorkerState::Unknown {
        "unknown"
    } else {
        "idle"
    }
}

/// Every dispatcher metric at `now`. `memory` carries label values seen by earlier scrapes.
pub fn gather(d: &Dispatcher, now: Timestamp, memory: &mut LabelMemory) -> Vec<Family> {
    let mut b = Builder {
        families: Vec::new(),
    };

    // Scheduler gauges (reference-scheduler.md §3.2, §6).
    let s = d.sched_metrics();
    b.scalar(
        "containers_allocated_not_started",
        "Number of containers allocated to a worker but not started yet (worker is booting).",
        Kind::Gauge,
        s.allocated_not_started as f64,
    );
    b.scalar(
        "containers_not_allocated_over_quota",
        "Number of containers not allocated to a worker because the system has hit a quota.",
        Kind::Gauge,
        s.not_allocated_over_quota as f64,
    );
    b.scalar(
        "containers_longest_wait_time_seconds",
        "Current longest wait time of any container since queuing, and before the start of crunch-run.",
        Kind::Gauge,
        s.longest_wait_seconds,
    );
    b.scalar(
        "last_503_time",
        "Time of most recent 503 error received from API.",
        Kind::Gauge,
        s.last_503_time,
    );
    b.scalar(
        "max_concurrent_containers",
        "Dynamically assigned limit on number of containers scheduled concurrency, set after receiving 503 errors from API.",
        Kind::Gauge,
        s.max_concurrent_containers as f64,
    );
    b.scalar(
        "at_quota",
        "Flag indicating the cloud driver is reporting an at-quota condition.",
        Kind::Gauge,
        if s.at_quota { 1.0 } else { 0.0 },
    );

    // Queue (reference-scheduler.md §4.8).
    let mut queue: BTreeMap<(String, String), u64> = memory
        .queue_entries
        .iter()
        .map(|k| (k.clone(), 0))
        .collect();
    for e in d.queue().entries().values() {
        // An entry with no eligible type (compatibility.md, S B1) counts under "" instead of
        // crashing the scrape as Go's unguarded index does.
        let it = e
            .types
            .first()
            .map(|id| d.types().get(*id).name.clone())
            .unwrap_or_default();
        *queue
            .entry((e.state().as_str().to_string(), it))
            .or_default() += 1;
    }
    memory.queue_entries.extend(queue.keys().cloned());
    let f = b.family(
        "queue_entries",
        "Number of active container entries in the controller database.",
        Kind::Gauge,
    );
    for ((state, it), n) in queue {
        f.samples.push(Sample {
            labels: vec![("state", state), ("instance_type", it)],
            value: SampleValue::Scalar(n as f64),
        });
    }

    // Pool gauges (reference-workers.md §8).
    let pool = d.pool();
    let mut running = 0usize;
    let mut probed: Vec<Timestamp> = Vec::with_capacity(pool.workers().len());
    let mut instances: BTreeMap<(&'static str, String), u64> = BTreeMap::new();
    for cat in CATEGORIES {
        for (_, t) in d.types().iter() {
            instances.insert((cat, t.name.clone()), 0);
        }
        for name in &memory.instance_types {
            instances.insert((cat, name.clone()), 0);
        }
    }
    let mut price: BTreeMap<&'static str, f64> = CATEGORIES.iter().map(|c| (*c, 0.0)).collect();
    let mut vcpus: BTreeMap<&'static str, f64> = CATEGORIES.iter().map(|c| (*c, 0.0)).collect();
    let mut memory_bytes: BTreeMap<&'static str, f64> =
        CATEGORIES.iter().map(|c| (*c, 0.0)).collect();
    for w in pool.workers().values() {
        running += w.runner_count();
        probed.push(w.probed);
        let cat = category(w);
        *instances.entry((cat, w.itype.name.clone())).or_default() += 1;
        if w.type_id.is_none() {
            memory.instance_types.insert(w.itype.name.clone());
        }
        *price.entry(cat).or_default() += w.itype.price;
        *vcpus.entry(cat).or_default() += w.itype.vcpus as f64;
        *memory_bytes.entry(cat).or_default() += w.itype.ram as f64;
    }
    probed.sort_unstable();
    let age = |t: Timestamp| now.since(t).as_secs_f64();
    let (age_max, age_median) = match probed.first() {
        None => (0.0, 0.0),
        Some(oldest) => (age(*oldest), age(probed[probed.len() / 2])),
    };
    b.scalar(
        "containers_running",
        "Number of containers reported running by cloud VMs.",
        Kind::Gauge,
        running as f64,
    );
    b.scalar(
        "probe_age_seconds_max",
        "Maximum number of seconds since an instance's most recent successful probe.",
        Kind::Gauge,
        age_max,
    );
    b.scalar(
        "probe_age_seconds_median",
        "Median number of seconds since an instance's most recent successful probe.",
        Kind::Gauge,
        age_median,
    );
    let f = b.family("instances_total", "Number of cloud VMs.", Kind::Gauge);
    for ((cat, it), n) in instances {
        f.samples.push(Sample {
            labels: vec![("category", cat.to_string()), ("instance_type", it)],
            value: SampleValue::Scalar(n as f64),
        });
    }
    for (name, help, values) in [
        ("instances_price", "Price of cloud VMs.", price),
        ("vcpus_total", "Total VCPUs on all cloud VMs.", vcpus),
        (
            "memory_bytes_total",
            "Total memory on all cloud VMs.",
            memory_bytes,
        ),
    ] {
        let f = b.family(name, help, Kind::Gauge);
        for (cat, v) in values {
            f.samples.push(Sample {
                labels: vec![("category", cat.to_string())],
                value: SampleValue::Scalar(v),
            });
        }
    }

    // Pool counters and summaries.
    let m = d.pool_metrics();
    let f = b.family("boot_outcomes", "Boot outcomes by type.", Kind::Counter);
    for o in BootOutcome::ALL {
        f.samples.push(Sample {
            labels: vec![("outcome", o.as_str().to_string())],
            value: SampleValue::Scalar(m.boot_outcomes[o as usize] as f64),
        });
    }
    let f = b.family(
        "instances_disappeared",
        "Number of occurrences of an instance disappearing from the cloud provider's list of instances.",
        Kind::Counter,
    );
    for st in WorkerState::ALL {
        f.samples.push(Sample {
            labels: vec![("state", st.as_str().to_string())],
            value: SampleValue::Scalar(m.instances_disappeared[st as usize] as f64),
        });
    }
    let f = b.family(
        "driver_operations",
        "Number of instance-create/destroy/list operations performed.",
        Kind::Counter,
    );
    for (i, op) in DRIVER_OPERATIONS.iter().enumerate() {
        for (error, n) in m.driver_operations[i].iter().enumerate() {
            f.samples.push(Sample {
                labels: vec![("operation", op.to_string()), ("error", error.to_string())],
                value: SampleValue::Scalar(*n as f64),
            });
        }
    }
    for (name, help, s) in [
        (
            "instances_time_to_ssh_seconds",
            "Number of seconds between instance creation and the first successful SSH connection.",
            &m.time_to_ssh,
        ),
        (
            "instances_time_to_ready_for_container_seconds",
            "Number of seconds between the first successful SSH connection and ready to run a container.",
            &m.time_to_ready,
        ),
        (
            "instances_time_from_shutdown_request_to_disappearance_seconds",
            "Number of seconds between the first shutdown attempt and the disappearance of the worker.",
            &m.shutdown_to_disappearance,
        ),
        (
            "containers_time_from_queue_to_crunch_run_seconds",
            "Number of seconds between the queuing of a container and the start of crunch-run.",
            &m.queue_to_crunch_run,
        ),
    ] {
        b.family(name, help, Kind::Summary).samples.push(Sample {
            labels: Vec::new(),
            value: summary_value(s, now),
        });
    }
    let f = b.family(
        "instances_run_probe_duration_seconds",
        "Number of seconds per runProbe call.",
        Kind::Summary,
    );
    for (outcome, s) in [
        ("fail", &m.run_probe_fail),
        ("success", &m.run_probe_success),
    ] {
        f.samples.push(Sample {
            labels: vec![("outcome", outcome.to_string())],
            value: summary_value(s, now),
        });
    }

    let mut families = b.families;
    for f in &mut families {
        sort_samples(f);
    }
    families.sort_by(|a, b| a.name.cmp(&b.name));
    families
}

/// Appends `extra` families (a cloud driver's, see `InstanceSet::metrics`) to `families`, which
/// [`gather`] sorted: the samples of each added family are sorted by their label values and all
/// families by name, so the output keeps the order Go's registry gathers in. A family of `extra`
/// whose name is already present is dropped (with a warning), as Go's registry refuses to
/// register a duplicate, and one without samples is dropped, as Go's registry omits it.
pub fn append_families(families: &mut Vec<Family>, extra: Vec<Family>) {
    for mut f in extra {
        if f.samples.is_empty() {
            continue;
        }
        if families.iter().any(|g| g.name == f.name) {
            tracing::warn!(metric = %f.name, "a driver metric family repeats a name; dropped");
            continue;
        }
        sort_samples(&mut f);
        families.push(f);
    }
    families.sort_by(|a, b| a.name.cmp(&b.name));
}

/// Sorts a family's samples by their label values.
fn sort_samples(f: &mut Family) {
    f.samples.sort_by(|a, b| {
        let ka = a.labels.iter().map(|(_, v)| v.as_str());
        let kb = b.labels.iter().map(|(_, v)| v.as_str());
        ka.cmp(kb)
    });
}

/// A float as Go's `strconv.FormatFloat(v, 'g', -1, 64)` writes it, which is what the
/// Prometheus Go client's text encoder uses: shortest round-trip digits, exponent form below
/// 1e-4 and from 1e6 on (`1e+06`, at least two exponent digits), `NaN`, `+Inf`, `-Inf`.
pub fn format_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("{:e} writes an integer exponent");
    if (-4..6).contains(&exp) {
        format!("{v}")
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_series(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, String)],
    extra: Option<(&str, String)>,
    v: String,
) {
    out.push_str(name);
    out.push_str(suffix);
    let all = labels
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(extra.as_ref().map(|(k, v)| (*k, v.as_str())));
    let mut first = true;
    for (k, val) in all {
        out.push(if first { '{' } else { ',' });
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        escape_label_value(val, out);
        out.push('"');
    }
    if !first {
        out.push('}');
    }
    out.push(' ');
    out.push_str(&v);
    out.push('\n');
}

/// The families in the Prometheus text format 0.0.4.
pub fn encode_text(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        out.push_str("# HELP ");
        out.push_str(&f.name);
        out.push(' ');
        escape_help(f.help, &mut out);
        out.push('\n');
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
        for s in &f.samples {
            match &s.value {
                SampleValue::Scalar(v) => {
                    write_series(&mut out, &f.name, "", &s.labels, None, format_float(*v))
                }
                SampleValue::Summary {
                    quantiles,
                    sum,
                    count,
                } => {
                    for (q, v) in quantiles {
                        write_series(
                            &mut out,
                            &f.name,
                            "",
                            &s.labels,
                            Some(("quantile", format_float(*q))),
                            format_float(*v),
                        );
                    }
                    write_series(
                        &mut out,
                        &f.name,
                        "_sum",
                        &s.labels,
                        None,
                        format_float(*sum),
                    );
                    write_series(
                        &mut out,
                        &f.name,
                        "_count",
                        &s.labels,
                        None,
                        count.to_string(),
                    );
                }
            }
        }
    }
    out
}

/// A JSON number, or `null` for NaN and infinities (JSON has no such numbers).
fn json_number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// The families as JSON in the shape of Go's `/metrics.json` (the `MetricFamily` protobuf
/// messages encoded with `encoding/json`): `[{"name","help","type","metric":[{"label":[...],
/// "gauge"|"counter":{"value"} | "summary":{"sample_count","sample_sum","quantile":[...]}}]}]`,
/// where `type` is the protobuf enum number (0 counter, 1 gauge, 2 summary). Values that JSON
/// cannot represent (NaN quantiles of an empty summary) are `null`.
pub fn encode_json(families: &[Family]) -> Value {
    Value::Array(
        families
            .iter()
            .map(|f| {
                let metrics: Vec<Value> = f
                    .samples
                    .iter()
                    .map(|s| {
                        let labels: Vec<Value> = s
                            .labels
                            .iter()
                            .map(|(k, v)| json!({"name": k, "value": v}))
                            .collect();
                        let mut m = serde_json::Map::new();
                        if !labels.is_empty() {
                            m.insert("label".into(), Value::Array(labels));
                        }
                        match &s.value {
                            SampleValue::Scalar(v) => {
                                let key = if f.kind == Kind::Counter {
                                    "counter"
                                } else {
                                    "gauge"
                                };
                                m.insert(key.into(), json!({"value": json_number(*v)}));
                            }
                            SampleValue::Summary {
                                quantiles,
                                sum,
                                count,
                            } => {
                                let qs: Vec<Value> = quantiles
                                    .iter()
                                    .map(|(q, v)| json!({"quantile": q, "value": json_number(*v)}))
                                    .collect();
                                m.insert(
                                    "summary".into(),
                                    json!({
                                        "sample_count": count,
                                        "sample_sum": json_number(*sum),
                                        "quantile": qs,
                                    }),
                                );
                            }
                        }
                        Value::Object(m)
                    })
                    .collect();
                json!({
                    "name": f.name,
                    "help": f.help,
                    "type": f.kind.proto_number(),
                    "metric": metrics,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_written_as_go_writes_them() {
        assert_eq!(format_float(0.0), "0");
        assert_eq!(format_float(1.0), "1");
        assert_eq!(format_float(0.5), "0.5");
        assert_eq!(format_float(0.62), "0.62");
        assert_eq!(format_float(1_700_000_000.0), "1.7e+09");
        assert_eq!(format_float(123_456.0), "123456");
        assert_eq!(format_float(1_234_567.0), "1.234567e+06");
        assert_eq!(format_float(0.0001), "0.0001");
        assert_eq!(format_float(0.00001), "1e-05");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(-2.5), "-2.5");
    }

    fn gauge(name: &str, samples: &[(&str, f64)]) -> Family {
        Family {
            name: name.into(),
            help: "H.",
            kind: Kind::Gauge,
            samples: samples
                .iter()
                .map(|(l, v)| Sample {
                    labels: vec![("l", l.to_string())],
                    value: SampleValue::Scalar(*v),
                })
                .collect(),
        }
    }

    #[test]
    fn appended_families_keep_name_and_label_order() {
        let mut fams = vec![gauge("a_x", &[("1", 1.0)]), gauge("c_x", &[("1", 1.0)])];
        append_families(
            &mut fams,
            vec![
                gauge("b_x", &[("z", 2.0), ("", 3.0), ("m", 4.0)]),
                // A name already there is dropped, and so is a family without samples.
                gauge("a_x", &[("9", 9.0)]),
                gauge("d_x", &[]),
            ],
        );
        let names: Vec<&str> = fams.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a_x", "b_x", "c_x"]);
        let labels: Vec<&str> = fams[1]
            .samples
            .iter()
            .map(|s| s.labels[0].1.as_str())
            .collect();
        assert_eq!(labels, ["", "m", "z"]);
        assert_eq!(fams[0].samples.len(), 1);
        assert_eq!(fams[0].samples[0].value, SampleValue::Scalar(1.0));
    }

    #[test]
    fn text_encoding_of_labels_and_summaries() {
        let fams = vec![
            Family {
                name: "x_gauge".into(),
                help: "A \\ help\nline.",
                kind: Kind::Gauge,
                samples: vec![Sample {
                    labels: vec![("a", "q\"uo\\te\n".into()), ("b", String::new())],
                    value: SampleValue::Scalar(2.0),
                }],
            },
            Family {
                name: "x_summary".into(),
                help: "S.",
                kind: Kind::Summary,
                samples: vec![Sample {
                    labels: vec![("outcome", "fail".into())],
                    value: SampleValue::Summary {
                        quantiles: vec![(0.5, f64::NAN), (0.99, 3.0)],
                        sum: 4.5,
                        count: 2,
                    },
                }],
            },
        ];
        assert_eq!(
            encode_text(&fams),
            "# HELP x_gauge A \\\\ help\\nline.\n# TYPE x_gauge gauge\n\
             x_gauge{a=\"q\\\"uo\\\\te\\n\",b=\"\"} 2\n\
             # HELP x_summary S.\n# TYPE x_summary summary\n\
             x_summary{outcome=\"fail\",quantile=\"0.5\"} NaN\n\
             x_summary{outcome=\"fail\",quantile=\"0.99\"} 3\n\
             x_summary_sum{outcome=\"fail\"} 4.5\n\
             x_summary_count{outcome=\"fail\"} 2\n"
        );
    }
}
