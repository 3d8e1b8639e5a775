//! The JSON report, the human summary, and the markdown table built from
//! several reports.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::publish::PubResult;
use crate::sub::{PhaseStats, SubResult};
use crate::{Mem, Plan, StormRun, Target, Transport};

/// Latency summary, microseconds.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Lat {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Lat {
    fn of(h: &Histogram<u64>) -> Lat {
        if h.is_empty() {
            return Lat::default();
        }
        Lat {
            count: h.len(),
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ConnectRep {
    pub requested: usize,
    pub connected: usize,
    pub failed: usize,
    pub seconds: f64,
    pub failures: BTreeMap<String, u64>,
    pub source_ips: Vec<String>,
    pub nofile_limit: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ServerRep {
    pub pids: Vec<u32>,
    pub rss_before_kb: Option<u64>,
    pub rss_connected_kb: Option<u64>,
    pub rss_end_kb: Option<u64>,
    pub pss_before_kb: Option<u64>,
    pub pss_connected_kb: Option<u64>,
    /// (RSS with subscribers connected - RSS before) / connected subscribers.
    pub rss_bytes_per_subscriber: Option<f64>,
    pub pss_bytes_per_subscriber: Option<f64>,
    pub fds_connected: Option<usize>,
    /// Server CPU seconds (user+system, all pids) during the run.
    pub cpu_seconds: Option<f64>,
    /// Exit status after SIGTERM when the tool spawned the server.
    pub exit: Option<String>,
    pub stop_seconds: Option<f64>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PublishRep {
    pub requested: u64,
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub statuses: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
    pub seconds: f64,
    pub events_per_sec: f64,
    pub latency_us: Lat,
    pub sample_response: Option<String>,
    /// The publishers' thread's nice value; null where the one asked was refused.
    pub thread_nice: Option<i32>,
}

impl PublishRep {
    fn of(p: &PubResult, requested: u64) -> Self {
        PublishRep {
            requested,
            sent: p.sent,
            ok: p.ok,
            errors: p.error_count,
            statuses: p
                .statuses
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            error_samples: p.errors.clone(),
            seconds: round3(p.seconds),
            events_per_sec: if p.seconds > 0.0 {
                (p.ok as f64 / p.seconds).round()
            } else {
                0.0
            },
            latency_us: Lat::of(&p.latency),
            sample_response: p.sample_body.clone(),
            thread_nice: p.thread_nice,
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct DeliveryRep {
    pub subscribers: usize,
    /// Events each subscriber should get.
    pub events_per_subscriber: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub id_not_increasing: u64,
    pub missing_id: u64,
    pub resets: u64,
    pub foreign: u64,
    pub bad_json: u64,
    pub closed_by_server: u64,
    pub stream_errors: u64,
    pub stream_error_samples: Vec<String>,
    pub subscribers_with_loss: u64,
    /// Missing deliveries by publishing batch: first events, replayed
    /// (storm), live during the storm.
    #[serde(default)]
    pub missing_by_batch: [u64; 3],
    /// A few missing seqs (of the first subscribers that missed any).
    #[serde(default)]
    pub missing_samples: Vec<u64>,
    /// From the first publish to the last delivery.
    pub seconds: f64,
    pub deliveries_per_sec: f64,
    pub e2e_us: Lat,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct StormRep {
    pub subscribers: usize,
    pub replay_events: u64,
    pub live_events: u64,
    pub reconnected: usize,
    pub failed: usize,
    /// From the reconnect signal until the last subscriber had its headers.
    pub reconnect_seconds: f64,
    pub caught_up: usize,
    /// From the reconnect signal until every subscriber had every replayed event.
    pub catch_up_seconds: Option<f64>,
    /// Per subscriber: from the reconnect signal until it had every replayed event.
    #[serde(default)]
    pub catch_up_us: Lat,
    /// From the reconnect signal until the last delivery (replay + live).
    pub complete_seconds: f64,
    pub rss_before_kb: Option<u64>,
    pub publish_back: PublishRep,
    pub publish_live: PublishRep,
    pub delivery: DeliveryRep,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SpecRep {
    pub checked: bool,
    pub bad_content_type: u64,
    pub missing_cache_control_no_cache: u64,
    pub missing_x_accel_buffering_no: u64,
    pub not_starting_with_retry: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ToolCpu {
    pub user_s: f64,
    pub system_s: f64,
    pub total_s: f64,
    pub wall_s: f64,
    /// total_s / wall_s: share of one core the tool used.
    pub cores_used: f64,
}

/// The machine the run shared with whatever else was running.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct MachineRep {
    pub cores: usize,
    pub mem_total_kb: Option<u64>,
    /// 1-minute load average when the run started and ended.
    pub loadavg_start: Option<f64>,
    pub loadavg_end: Option<f64>,
    /// CPU seconds that processes other than the server and this tool used
    /// during the run (from /proc/stat), and their share of all cores.
    #[serde(default)]
    pub others_cpu_s: Option<f64>,
    #[serde(default)]
    pub others_share: Option<f64>,
    /// CPU seconds the hypervisor took away (steal).
    #[serde(default)]
    pub steal_s: Option<f64>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub date_utc: String,
    pub label: String,
    pub target: String,
    pub url: String,
    pub workload: String,
    pub plan: serde_json::Value,
    pub connect: ConnectRep,
    pub server: ServerRep,
    pub publish: PublishRep,
    pub delivery: DeliveryRep,
    pub storm: Option<StormRep>,
    pub spec: SpecRep,
    pub tool_cpu: ToolCpu,
    #[serde(default)]
    pub machine: MachineRep,
    pub p99_target_ms: Option<f64>,
    pub p99_target_met: Option<bool>,
    /// The run reached --max-duration: missing deliveries may only be late.
    #[serde(default)]
    pub cut_short: bool,
    #[serde(default)]
    pub max_duration_s: f64,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

pub struct Inputs {
    pub label: String,
    pub target: Target,
    pub url: String,
    pub plan: Plan,
    pub pids: Vec<u32>,
    pub srcs: Vec<String>,
    pub connect_seconds: f64,
    pub mem_before: Mem,
    pub mem_connected: Mem,
    pub mem_end: Mem,
    pub fds_connected: Option<usize>,
    pub server_cpu: Option<f64>,
    pub server_exit: Option<(String, f64)>,
    pub pub0: PubResult,
    pub first_delivery_phase0_last_ns: u64,
    pub e2e0: Histogram<u64>,
    pub e2e1: Histogram<u64>,
    pub storm: Option<StormRun>,
    pub results: Vec<SubResult>,
    pub tool_cpu: (f64, f64),
    pub wall_s: f64,
    pub nofile: u64,
    pub cut_short: bool,
    pub max_duration: f64,
    pub machine: MachineRep,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn short(s: &str) -> String {
    s.chars().take(120).collect()
}

fn delivery(
    phases: &[&PhaseStats],
    per_sub: u64,
    first_ns: u64,
    last_ns: u64,
    e2e: &Histogram<u64>,
) -> DeliveryRep {
    let mut d = DeliveryRep {
        subscribers: phases.len(),
        events_per_subscriber: per_sub,
        expected: per_sub * phases.len() as u64,
        ..Default::default()
    };
    for p in phases {
        d.received += p.received;
        let lost = per_sub.saturating_sub(p.distinct);
        d.lost += lost;
        if lost > 0 {
            d.subscribers_with_loss += 1;
        }
        for b in 0..3 {
            d.missing_by_batch[b] += p.missing_by_batch[b];
        }
        if d.missing_samples.len() < 10 {
            d.missing_samples.extend(p.missing_samples.iter().take(2));
        }
        d.duplicated += p.duplicated;
        d.out_of_order += p.out_of_order;
        d.id_not_increasing += p.id_not_increasing;
        d.missing_id += p.missing_id;
        d.resets += p.resets;
        d.foreign += p.foreign;
        d.bad_json += p.bad_json;
        d.closed_by_server += p.closed_by_server as u64;
        if let Some(e) = &p.error {
            d.stream_errors += 1;
            if d.stream_error_samples.len() < 5 {
                d.stream_error_samples.push(short(e));
            }
        }
    }
    if last_ns > first_ns && first_ns > 0 {
        d.seconds = round3((last_ns - first_ns) as f64 / 1e9);
        d.deliveries_per_sec = (d.received as f64 / ((last_ns - first_ns) as f64 / 1e9)).round();
    }
    d.e2e_us = Lat::of(e2e);
    d
}

fn delivery_problems(what: &str, d: &DeliveryRep, cut_short: bool, out: &mut Vec<String>) {
    let mut add = |n: u64, msg: &str| {
        if n > 0 {
            out.push(format!("{what}: {n} {msg}"));
        }
    };
    add(
        d.lost,
        &format!(
            "deliveries {} ({} of {} subscribers missed events)",
            if cut_short {
                "missing when the run was cut at --max-duration (late or lost)"
            } else {
                "lost"
            },
            d.subscribers_with_loss,
            d.subscribers
        ),
    );
    add(d.duplicated, "duplicated deliveries");
    add(d.out_of_order, "out-of-order deliveries");
    add(
        d.id_not_increasing,
        "events whose id did not strictly increase",
    );
    add(d.missing_id, "events without an id");
    add(d.resets, "reset events");
    add(d.bad_json, "events whose data is not JSON");
    add(d.closed_by_server, "streams closed by the server");
    add(d.stream_errors, "stream errors");
}

fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn build(i: Inputs) -> Report {
    let mut problems = i.problems;
    let mut warnings = i.warnings;
    let n = i.plan.subscribers;
    let ok_status = i.plan.transport.ok_status();

    // Connect.
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut connected = 0;
    for r in &i.results {
        match (&r.error, r.status) {
            (None, Some(status)) if status == ok_status => connected += 1,
            (Some(e), _) => *failures.entry(short(e)).or_default() += 1,
            (None, s) => *failures.entry(format!("status {s:?}")).or_default() += 1,
        }
    }
    let failed = n - connected;
    if failed > 0 {
        problems.push(format!(
            "{failed} of {n} subscribers could not connect: {failures:?}"
        ));
    }

    // Server memory.
    let per_sub = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if connected > 0 => {
            Some(((b as f64 - a as f64) * 1024.0 / connected as f64).round())
        }
        _ => None,
    };
    let server = ServerRep {
        pids: i.pids.clone(),
        rss_before_kb: i.mem_before.rss_kb,
        rss_connected_kb: i.mem_connected.rss_kb,
        rss_end_kb: i.mem_end.rss_kb,
        pss_before_kb: i.mem_before.pss_kb,
        pss_connected_kb: i.mem_connected.pss_kb,
        rss_bytes_per_subscriber: per_sub(i.mem_before.rss_kb, i.mem_connected.rss_kb),
        pss_bytes_per_subscriber: per_sub(i.mem_before.pss_kb, i.mem_connected.pss_kb),
        fds_connected: i.fds_connected,
        cpu_seconds: i.server_cpu.map(round3),
        exit: i.server_exit.as_ref().map(|e| e.0.clone()),
        stop_seconds: i.server_exit.as_ref().map(|e| round3(e.1)),
    };
    if let Some((st, secs)) = &i.server_exit {
        if !st.contains("exit status: 0") {
            warnings.push(format!(
                "server did not exit 0 after SIGTERM: {st} ({secs:.1}s)"
            ));
        }
    }

    // Phase 0 delivery.
    let publish = PublishRep::of(&i.pub0, i.plan.events);
    if i.pub0.error_count > 0 {
        problems.push(format!(
            "{} publishes failed: {:?}",
            i.pub0.error_count, i.pub0.errors
        ));
    }
    let ok_subs: Vec<&SubResult> = i
        .results
        .iter()
        .filter(|r| r.error.is_none() && r.status == Some(ok_status))
        .collect();
    let phases0: Vec<&PhaseStats> = ok_subs.iter().filter_map(|r| r.phases.first()).collect();
    let delivery0 = delivery(
        &phases0,
        i.pub0.ok,
        i.pub0.first_send_ns,
        i.first_delivery_phase0_last_ns,
        &i.e2e0,
    );
    delivery_problems("delivery", &delivery0, i.cut_short, &mut problems);

    // Storm.
    let storm = i.storm.as_ref().map(|s| {
        let phases1: Vec<&PhaseStats> = ok_subs.iter().filter_map(|r| r.phases.get(1)).collect();
        let per = s.pub_back.ok + s.pub_live.ok;
        let mut d = delivery(&phases1, per, 0, 0, &i.e2e1);
        if s.complete_seconds > 0.0 {
            d.seconds = round3(s.complete_seconds);
            d.deliveries_per_sec = (d.received as f64 / s.complete_seconds).round();
        }
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        for r in &ok_subs {
            if let Some(e) = &r.storm_error {
                *failures.entry(short(e)).or_default() += 1;
            }
        }
        if s.refailed > 0 {
            problems.push(format!(
                "storm: {} subscribers could not reconnect: {failures:?}",
                s.refailed
            ));
        }
        if s.caught_up < s.reconnected {
            problems.push(format!(
                "storm: only {} of {} reconnected subscribers caught up",
                s.caught_up, s.reconnected
            ));
        }
        if s.pub_back.error_count + s.pub_live.error_count > 0 {
            problems.push(format!(
                "storm: {} publishes failed",
                s.pub_back.error_count + s.pub_live.error_count
            ));
        }
        delivery_problems("storm", &d, i.cut_short, &mut problems);
        StormRep {
            subscribers: ok_subs.len(),
            replay_events: s.pub_back.ok,
            live_events: s.pub_live.ok,
            reconnected: s.reconnected,
            failed: s.refailed,
            reconnect_seconds: round3(s.reconnect_seconds),
            caught_up: s.caught_up,
            catch_up_seconds: s.catch_up_seconds.map(round3),
            catch_up_us: Lat::of(&s.catch_up_us),
            complete_seconds: round3(s.complete_seconds),
            rss_before_kb: s.mem_before.rss_kb,
            publish_back: PublishRep::of(&s.pub_back, i.plan.storm_back),
            publish_live: PublishRep::of(&s.pub_live, i.plan.storm_live),
            delivery: d,
        }
    });

    // Contract checks on the response head and stream start.
    // (A WebSocket has no SSE head or `retry:` to check.)
    let sse = i.plan.transport == Transport::Sse;
    let mut spec = SpecRep {
        checked: sse && i.target == Target::Taskstream,
        ..Default::default()
    };
    for r in ok_subs.iter().filter(|_| sse) {
        spec.bad_content_type += !r.content_type_ok as u64;
        spec.missing_cache_control_no_cache += !r.cache_control_ok as u64;
        spec.missing_x_accel_buffering_no += !r.x_accel_ok as u64;
        spec.not_starting_with_retry += (r.first_field_retry != Some(true)) as u64;
    }
    if spec.bad_content_type > 0 {
        problems.push(format!(
            "{} streams without Content-Type: text/event-stream",
            spec.bad_content_type
        ));
    }
    if spec.checked {
        if spec.missing_cache_control_no_cache > 0 {
            warnings.push(format!(
                "SPEC: {} streams without Cache-Control: no-cache",
                spec.missing_cache_control_no_cache
            ));
        }
        if spec.missing_x_accel_buffering_no > 0 {
            warnings.push(format!(
                "SPEC: {} streams without X-Accel-Buffering: no",
                spec.missing_x_accel_buffering_no
            ));
        }
        if spec.not_starting_with_retry > 0 {
            warnings.push(format!(
                "SPEC: {} streams did not start with a retry: field",
                spec.not_starting_with_retry
            ));
        }
    }

    let p99_target_met = i
        .plan
        .p99_target_ms
        .map(|t| delivery0.e2e_us.count > 0 && (delivery0.e2e_us.p99 as f64) < t * 1000.0);
    if p99_target_met == Some(false) {
        warnings.push(format!(
            "e2e p99 {:.3} ms is over the {} ms target",
            delivery0.e2e_us.p99 as f64 / 1000.0,
            i.plan.p99_target_ms.unwrap_or_default()
        ));
    }

    if let Some(share) = i.machine.others_share {
        if share > 0.1 {
            warnings.push(format!(
                "other processes used {:.0}% of the machine's CPU during the run: numbers are pessimistic",
                share * 100.0
            ));
        }
    }
    let total = i.tool_cpu.0 + i.tool_cpu.1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Report {
        tool: "taskstream-bench".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        date_utc: utc_date(now),
        label: i.label,
        target: format!("{:?}", i.target).to_lowercase(),
        url: i.url,
        workload: i.plan.workload.clone(),
        plan: serde_json::to_value(&i.plan).unwrap_or_default(),
        connect: ConnectRep {
            requested: n,
            connected,
            failed,
            seconds: round3(i.connect_seconds),
            failures,
            source_ips: i.srcs,
            nofile_limit: i.nofile,
        },
        server,
        publish,
        delivery: delivery0,
        storm,
        spec,
        tool_cpu: ToolCpu {
            user_s: round3(i.tool_cpu.0),
            system_s: round3(i.tool_cpu.1),
            total_s: round3(total),
            wall_s: round3(i.wall_s),
            cores_used: if i.wall_s > 0.0 {
                round3(total / i.wall_s)
            } else {
                0.0
            },
        },
        machine: i.machine,
        cut_short: i.cut_short,
        max_duration_s: i.max_duration,
        p99_target_ms: i.plan.p99_target_ms,
        p99_target_met,
        problems,
        warnings,
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn lat_line(l: &Lat) -> String {
    format!(
        "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms (n={})",
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.max),
        l.count
    )
}

fn delivery_lines(out: &mut String, d: &DeliveryRep) {
    let _ = writeln!(
        out,
        "  deliveries: {} of {} expected ({} subscribers x {} events)",
        d.received, d.expected, d.subscribers, d.events_per_subscriber
    );
    let _ = writeln!(
        out,
        "  lost {}, duplicated {}, out of order {}, ids not increasing {}, missing ids {}, resets {}, foreign {}, closed by server {}, stream errors {}",
        d.lost,
        d.duplicated,
        d.out_of_order,
        d.id_not_increasing,
        d.missing_id,
        d.resets,
        d.foreign,
        d.closed_by_server,
        d.stream_errors
    );
    let _ = writeln!(
        out,
        "  throughput: {} deliveries/s over {:.3} s",
        d.deliveries_per_sec, d.seconds
    );
    let _ = writeln!(out, "  end-to-end: {}", lat_line(&d.e2e_us));
}

/// Human-readable summary (stderr).
pub fn human(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "== taskstream-bench: workload {} against {} ({}) at {}",
        r.workload, r.label, r.target, r.url
    );
    let c = &r.connect;
    let _ = writeln!(
        o,
        "subscribers: {}/{} connected in {:.3} s ({} failed){}",
        c.connected,
        c.requested,
        c.seconds,
        c.failed,
        if c.source_ips.is_empty() {
            String::new()
        } else {
            format!(", from {} source addresses", c.source_ips.len())
        }
    );
    let s = &r.server;
    let kb = |v: Option<u64>| {
        v.map(|v| format!("{:.1} MiB", v as f64 / 1024.0))
            .unwrap_or("?".into())
    };
    let _ = writeln!(
        o,
        "server {:?}: RSS {} before, {} connected, {} at end; {} bytes/subscriber (PSS {}); CPU {} s",
        s.pids,
        kb(s.rss_before_kb),
        kb(s.rss_connected_kb),
        kb(s.rss_end_kb),
        s.rss_bytes_per_subscriber.map(|v| v.to_string()).unwrap_or("?".into()),
        s.pss_bytes_per_subscriber.map(|v| v.to_string()).unwrap_or("?".into()),
        s.cpu_seconds.map(|v| format!("{v:.2}")).unwrap_or("?".into()),
    );
    let p = &r.publish;
    let _ = writeln!(
        o,
        "publish: {}/{} ok in {:.3} s ({} events/s), statuses {:?}; round trip {}",
        p.ok,
        p.requested,
        p.seconds,
        p.events_per_sec,
        p.statuses,
        lat_line(&p.latency_us)
    );
    delivery_lines(&mut o, &r.delivery);
    if let Some(st) = &r.storm {
        let _ = writeln!(
            o,
            "storm: {} subscribers reconnected at once ({} failed) with Last-Event-ID {} events back, {} live events during it",
            st.reconnected, st.failed, st.replay_events, st.live_events
        );
        let _ = writeln!(
            o,
            "  all reconnected after {:.3} s; all caught up after {}; last delivery after {:.3} s",
            st.reconnect_seconds,
            st.catch_up_seconds
                .map(|v| format!("{v:.3} s"))
                .unwrap_or("never".into()),
            st.complete_seconds
        );
        let _ = writeln!(
            o,
            "  catch-up time per subscriber: {}",
            lat_line(&st.catch_up_us)
        );
        delivery_lines(&mut o, &st.delivery);
    }
    if let Some(e) = &s.exit {
        let _ = writeln!(
            o,
            "server stopped with SIGTERM: {e} after {:.2} s",
            s.stop_seconds.unwrap_or_default()
        );
    }
    let m = &r.machine;
    let _ = writeln!(
        o,
        "machine: {} cores, load average {} at start, {} at end; other processes used {} CPU s ({}% of the cores), steal {} s",
        m.cores,
        m.loadavg_start
            .map(|v| format!("{v:.2}"))
            .unwrap_or("?".into()),
        m.loadavg_end
            .map(|v| format!("{v:.2}"))
            .unwrap_or("?".into()),
        m.others_cpu_s
            .map(|v| format!("{v:.1}"))
            .unwrap_or("?".into()),
        m.others_share
            .map(|v| format!("{:.0}", v * 100.0))
            .unwrap_or("?".into()),
        m.steal_s.map(|v| format!("{v:.1}")).unwrap_or("?".into()),
    );
    let t = &r.tool_cpu;
    let _ = writeln!(
        o,
        "tool CPU: {:.2} s user + {:.2} s system over {:.2} s wall ({:.0}% of one core)",
        t.user_s,
        t.system_s,
        t.wall_s,
        t.cores_used * 100.0
    );
    if let (Some(t), Some(met)) = (r.p99_target_ms, r.p99_target_met) {
        let _ = writeln!(
            o,
            "p99 target {t} ms: {}",
            if met { "met" } else { "MISSED" }
        );
    }
    for w in &r.warnings {
        let _ = writeln!(o, "WARNING: {w}");
    }
    for p in &r.problems {
        let _ = writeln!(o, "PROBLEM: {p}");
    }
    if r.cut_short {
        let _ = writeln!(
            o,
            "the run was cut at --max-duration ({} s)",
            r.max_duration_s
        );
    }
    let _ = writeln!(
        o,
        "result: {}",
        if r.problems.is_empty() {
            "PASS"
        } else {
            "FAIL"
        }
    );
    o
}

/// One markdown table row per report.
pub fn print_table(files: &[PathBuf]) -> Result<()> {
    let mut reps = Vec::new();
    for f in files {
        let s = std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
        let r: Report =
            serde_json::from_str(s.trim()).with_context(|| format!("parse {}", f.display()))?;
        reps.push(r);
    }
    reps.sort_by(|a, b| a.workload.cmp(&b.workload).then(a.label.cmp(&b.label)));
    // The bare-socket peer (bench/src/bare.rs) is the practical limit: every other server's
    // deliveries/s is also given as a share of it.
    let limit: BTreeMap<&str, f64> = reps
        .iter()
        .filter(|r| r.label == "bare" && r.storm.is_none())
        .map(|r| (r.workload.as_str(), r.delivery.deliveries_per_sec))
        .collect();
    println!("| workload | server | subs | events | deliveries/s | e2e p50 ms | e2e p99 ms | publish p99 ms | RSS/sub | lost/dup/ooo | notes | tool CPU |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |");
    for r in &reps {
        let d = &r.delivery;
        let mut notes = Vec::new();
        let (dps, lost, dup, ooo) = match &r.storm {
            Some(s) => {
                notes.push(format!(
                    "storm: {}/{} reconnected in {:.2} s, caught up in {}",
                    s.reconnected,
                    s.subscribers,
                    s.reconnect_seconds,
                    s.catch_up_seconds
                        .map(|v| format!("{v:.2} s"))
                        .unwrap_or("—(not all)".into())
                ));
                if s.catch_up_us.count > 0 {
                    notes.push(format!(
                        "per subscriber p50 {:.2} s, p99 {:.2} s",
                        s.catch_up_us.p50 as f64 / 1e6,
                        s.catch_up_us.p99 as f64 / 1e6
                    ));
                }
                (
                    s.delivery.deliveries_per_sec,
                    d.lost + s.delivery.lost,
                    d.duplicated + s.delivery.duplicated,
                    d.out_of_order + s.delivery.out_of_order,
                )
            }
            None => (d.deliveries_per_sec, d.lost, d.duplicated, d.out_of_order),
        };
        if let Some(&bare) = limit.get(r.workload.as_str()) {
            if r.label != "bare" && r.storm.is_none() && bare > 0.0 {
                notes.push(format!("{:.0} % of bare", dps / bare * 100.0));
            }
        }
        if r.connect.failed > 0 {
            notes.push(format!("{} subs failed", r.connect.failed));
        }
        if let (Some(t), Some(met)) = (r.p99_target_ms, r.p99_target_met) {
            notes.push(format!(
                "p99 < {t} ms: {}",
                if met { "yes" } else { "**no**" }
            ));
        }
        let resets = d.resets + r.storm.as_ref().map_or(0, |s| s.delivery.resets);
        if resets > 0 {
            notes.push(format!("{resets} resets"));
        }
        let ids =
            d.id_not_increasing + r.storm.as_ref().map_or(0, |s| s.delivery.id_not_increasing);
        if ids > 0 {
            notes.push(format!("{ids} ids not increasing"));
        }
        if r.cut_short {
            notes.push("cut at run cap: missing = not delivered in time".into());
        }
        if let Some(share) = r.machine.others_share {
            if share > 0.1 {
                notes.push(format!("others used {:.0}% of CPU", share * 100.0));
            }
        }
        if !r.problems.is_empty() && lost + dup + ooo == 0 {
            notes.push(format!("{} problems", r.problems.len()));
        }
        let rss = r
            .server
            .rss_bytes_per_subscriber
            .map(|b| {
                if b.abs() >= 1024.0 {
                    format!("{:.1} KiB", b / 1024.0)
                } else {
                    format!("{b:.0} B")
                }
            })
            .unwrap_or("?".into());
        let events = match &r.storm {
            Some(s) => format!("{}+{}+{}", r.publish.ok, s.replay_events, s.live_events),
            None => r.publish.ok.to_string(),
        };
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {}/{}/{} | {} | {:.1} s ({:.0}%) |",
            r.workload,
            r.label,
            r.connect.connected,
            events,
            dps,
            ms(d.e2e_us.p50),
            ms(d.e2e_us.p99),
            ms(r.publish.latency_us.p99),
            rss,
            lost,
            dup,
            ooo,
            notes.join("; "),
            r.tool_cpu.total_s,
            r.tool_cpu.cores_used * 100.0
        );
    }
    Ok(())
}
