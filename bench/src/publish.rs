//! Publishers: K keep-alive connections posting events, at a fixed rate or as
//! fast as the server answers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::http::{HttpConn, Node};
use crate::sub::{new_hist, now_ns};

pub struct PubCfg {
    /// Publisher `k` posts to node `k % nodes.len()`.
    pub nodes: Vec<Node>,
    /// Request target, e.g. `/update_task` or `/pub?id=tasks`.
    pub path: String,
    pub run: u64,
    pub tasks: u64,
    pub publishers: usize,
    /// Asked for the publishers' thread (see `--publisher-nice`).
    pub thread_nice: i32,
}

/// Result of publishing one batch of seqs.
pub struct PubResult {
    pub sent: u64,
    pub ok: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: Vec<String>,
    pub error_count: u64,
    /// Seqs that were not acknowledged with a 2xx.
    pub failed_seqs: Vec<u64>,
    pub first_send_ns: u64,
    pub last_ack_ns: u64,
    pub seconds: f64,
    pub latency: Histogram<u64>,
    /// One sample of a successful response body.
    pub sample_body: Option<String>,
    /// The publishers' thread's nice value, None where the one asked was refused.
    pub thread_nice: Option<i32>,
}

impl PubResult {
    fn empty() -> Self {
        PubResult {
            sent: 0,
            ok: 0,
            statuses: BTreeMap::new(),
            errors: Vec::new(),
            error_count: 0,
            failed_seqs: Vec::new(),
            first_send_ns: u64::MAX,
            last_ack_ns: 0,
            seconds: 0.0,
            latency: new_hist(),
            sample_body: None,
            thread_nice: None,
        }
    }
}

impl PubCfg {
    fn node(&self, publisher: usize) -> &Node {
        &self.nodes[publisher % self.nodes.len()]
    }
}

fn request(cfg: &PubCfg, publisher: usize, seq: u64, sent_ns: u64) -> Vec<u8> {
    let body = format!(
        "{{\"task_id\":{},\"data\":{{\"run\":{},\"pub\":{},\"seq\":{},\"sent_ns\":{}}}}}",
        seq % cfg.tasks.max(1) + 1,
        cfg.run,
        publisher,
        seq,
        sent_ns
    );
    format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json\r\nUser-Agent: taskstream-bench\r\nContent-Length: {}\r\n\r\n{}",
        cfg.path,
        cfg.node(publisher).host,
        body.len(),
        body
    )
    .into_bytes()
}

/// Publish seqs `lo..lo+count`. With `rate`, seq `lo+i` is sent no earlier
/// than `start + i/rate`; without, each publisher sends back to back.
/// Stops early at `stop_at`; each request may take at most 10 s.
///
/// The publishers get a thread and runtime of their own: on the subscribers'
/// runtime each publish would queue behind thousands of readers, and "as fast
/// as the server accepts" would measure the tool's scheduler instead.
pub async fn publish(
    cfg: Arc<PubCfg>,
    lo: u64,
    count: u64,
    rate: Option<f64>,
    stop_at: Instant,
) -> PubResult {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("publishers".into())
        .spawn(move || {
            let thread_nice = crate::sys::set_thread_nice(cfg.thread_nice);
            if thread_nice.is_none() {
                eprintln!(
                    "publishers: nice {} refused (it needs CAP_SYS_NICE); publish round trips \
                     include this tool's own wait for a core",
                    cfg.thread_nice
                );
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("publisher runtime");
            let mut result = rt.block_on(publish_here(cfg, lo, count, rate, stop_at));
            result.thread_nice = thread_nice;
            let _ = tx.send(result);
        })
        .expect("spawn publisher thread");
    rx.await.expect("publisher thread panicked")
}

async fn publish_here(
    cfg: Arc<PubCfg>,
    lo: u64,
    count: u64,
    rate: Option<f64>,
    stop_at: Instant,
) -> PubResult {
    let next = Arc::new(AtomicU64::new(lo));
    let hi = lo + count;
    let t0 = Instant::now();
    let tokio_t0 = tokio::time::Instant::from_std(t0);
    let mut handles = Vec::new();
    for publisher in 0..cfg.publishers.max(1) {
        let cfg = cfg.clone();
        let next = next.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = HttpConn::new(cfg.node(publisher).addr, None);
            let mut r = PubResult::empty();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= hi {
                    break;
                }
                if let Some(rate) = rate {
                    let at = tokio_t0 + Duration::from_secs_f64((seq - lo) as f64 / rate);
                    tokio::time::sleep_until(at).await;
                }
                if Instant::now() >= stop_at {
                    // Not sent: the run's time is up.
                    r.failed_seqs.push(seq);
                    break;
                }
                let sent_ns = now_ns();
                let req = request(&cfg, publisher, seq, sent_ns);
                let t = Instant::now();
                r.first_send_ns = r.first_send_ns.min(sent_ns);
                r.sent += 1;
                let answer = match tokio::time::timeout(
                    Duration::from_secs(10),
                    conn.round_trip(&req),
                )
                .await
                {
                    Ok(a) => a,
                    Err(_) => {
                        conn = HttpConn::new(cfg.node(publisher).addr, None);
                        Err(anyhow::anyhow!("no answer within 10 s"))
                    }
                };
                match answer {
                    Ok(resp) => {
                        let us = t.elapsed().as_micros() as u64;
                        r.latency.saturating_record(us.max(1));
                        *r.statuses.entry(resp.status).or_default() += 1;
                        if (200..300).contains(&resp.status) {
                            r.ok += 1;
                            r.last_ack_ns = r.last_ack_ns.max(now_ns());
                            if r.sample_body.is_none() {
                                r.sample_body = Some(
                                    String::from_utf8_lossy(&resp.body)
                                        .chars()
                                        .take(400)
                                        .collect(),
                                );
                            }
                        } else {
                            r.failed_seqs.push(seq);
                            r.error_count += 1;
                            if r.errors.len() < 5 {
                                r.errors.push(format!(
                                    "status {}: {}",
                                    resp.status,
                                    String::from_utf8_lossy(&resp.body)
                                        .chars()
                                        .take(200)
                                        .collect::<String>()
                                ));
                            }
                        }
                    }
                    Err(e) => {
                        r.failed_seqs.push(seq);
                        r.error_count += 1;
                        if r.errors.len() < 5 {
                            r.errors.push(format!("{e:#}"));
                        }
                        // Back off a little so a dead server does not spin us.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            r
        }));
    }
    let mut total = PubResult::empty();
    for h in handles {
        let Ok(r) = h.await else { continue };
        total.sent += r.sent;
        total.ok += r.ok;
        for (k, v) in r.statuses {
            *total.statuses.entry(k).or_default() += v;
        }
        total.error_count += r.error_count;
        for e in r.errors {
            if total.errors.len() < 5 {
                total.errors.push(e);
            }
        }
        total.failed_seqs.extend(r.failed_seqs);
        total.first_send_ns = total.first_send_ns.min(r.first_send_ns);
        total.last_ack_ns = total.last_ack_ns.max(r.last_ack_ns);
        let _ = total.latency.add(&r.latency);
        if total.sample_body.is_none() {
            total.sample_body = r.sample_body;
        }
    }
    // Seqs no publisher took because the run's time was up.
    let taken = next.load(Ordering::Relaxed).min(hi);
    total.failed_seqs.extend(taken..hi);
    total.seconds = t0.elapsed().as_secs_f64();
    total.failed_seqs.sort_unstable();
    total
}
