//! One URL's worker: reads its subscription while its book has room, sends up to
//! `--webhook-concurrency` requests, retries each event with backoff until `--webhook-max-age`,
//! and stores its position once a second and when it stops.

use super::book::Book;
use super::{Settings, Target};
use crate::auth::Access;
use crate::backend::redis::webhook::WebhookGroup;
use crate::event::{Event, EventId};
use crate::hub::{Delivery, Resume, Subscription};
use crate::state::AppState;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use log::{debug, error, info, warn};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// Events a worker holds at most (taken and not finished, or finished above an older open one).
/// Beyond it the subscription is not read: one event retried for hours holds back at most this
/// many later ones of other tasks, and memory stays bounded.
pub const WINDOW: usize = 4096;

/// The first retry waits `backoff`, each next one twice as long, up to this many times `backoff`
/// (10 min for the default 1 s).
const MAX_BACKOFF_FACTOR: u32 = 600;

/// A receiver's answer body is read (so the connection can be reused) up to this much.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

enum Outcome {
    Delivered,
    DeadLettered,
    /// Given up at shutdown without a final answer: sent again after a restart.
    Abandoned,
}

/// Where a worker on the log starts: its subscription and the position it was opened at.
pub struct LogStart {
    subscription: Subscription,
    start: EventId,
}

pub struct Worker {
    state: Arc<AppState>,
    settings: Arc<Settings>,
    target: Arc<Target>,
    stopping: CancellationToken,
    label: String,
}

impl Worker {
    pub fn new(
        state: Arc<AppState>,
        settings: Arc<Settings>,
        target: Target,
        stopping: CancellationToken,
    ) -> Worker {
        Worker {
            state,
            settings,
            label: target.index.to_string(),
            target: Arc::new(target),
            stopping,
        }
    }

    /// On the log (memory, `--data-dir`): reads the stored position and subscribes. Awaited
    /// before the server takes its first request, so every event acknowledged from then on
    /// reaches this worker; `None` (logged) when it cannot deliver at all. On Redis the consumer
    /// group plays this part (created in `webhook::start`).
    pub async fn open_log(&self) -> Option<LogStart> {
        let backend = self.state.service.backend();
        let stored = match backend.webhook_position(&self.target.key).await {
            Ok(stored) => stored,
            Err(e) => {
                error!(
                    "webhook {}: cannot read its position ({e}); not delivering",
                    self.target.shown
                );
                return None;
            }
        };
        let resume = stored.map_or(Resume::Live, Resume::After);
        let open = self
            .state
            .service
            .subscribe(&Access::Open, None, resume, HashSet::new())
            .await;
        let subscription = match open {
            Ok(open) => open.subscription,
            Err(e) => {
                error!("webhook {}: cannot subscribe ({e})", self.target.shown);
                return None;
            }
        };
        // Nothing is published before the server serves, so the head is where a live
        // subscription starts.
        let start = stored.unwrap_or_else(|| self.state.hub().head());
        match stored {
            Some(at) => info!("webhook {}: resuming after {at}", self.target.shown),
            // Stored at once, so a crash before the first delivery still resumes from here.
            None => self.save(start).await,
        }
        Some(LogStart {
            subscription,
            start,
        })
    }

    /// Delivers until the lifecycle stops: from the consumer group on Redis, else from `log`.
    pub async fn run(self, log: Option<LogStart>) {
        let backend = self.state.service.backend();
        if let Some(group) = backend.webhook_group(&self.target.key, self.settings.lease) {
            return self.run_group(group).await;
        }
        let Some(LogStart {
            mut subscription,
            start,
        }) = log
        else {
            return;
        };
        let mut book = Book::new(start, self.settings.concurrency, WINDOW);
        let mut saved = start;
        // Ends the backoff waits at shutdown; requests already sent get until the deadline.
        let draining = CancellationToken::new();
        let mut in_flight = FuturesUnordered::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut taking = true;
        while taking {
            while let Some(event) = book.next_to_send() {
                in_flight.push(self.deliver(event, draining.clone()));
            }
            tokio::select! {
                () = self.stopping.cancelled() => taking = false,
                Some((event, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                    self.settle(&mut book, &event, outcome);
                }
                delivery = subscription.next(), if book.has_room() => match delivery {
                    Some(Delivery::Event(event)) => book.take(event),
                    Some(Delivery::Reset { newest, reason }) => {
                        self.state.metrics.webhook_gaps.with_label_values(&[&self.label]).inc();
                        warn!(
                            "webhook {}: events after {} up to {newest} are no longer in the log ({reason:?}) and were not delivered",
                            self.target.shown,
                            book.newest_taken()
                        );
                        book.skip_to(newest);
                    }
                    Some(Delivery::Compacted { since, tasks }) => {
                        // The receiver gets each changed task's latest event, not the versions
                        // in between: for a webhook that is a gap, counted and logged as one.
                        self.state.metrics.webhook_gaps.with_label_values(&[&self.label]).inc();
                        warn!(
                            "webhook {}: events after {since} are no longer in the log; only the latest event of each of {tasks} changed task(s) is delivered",
                            self.target.shown
                        );
                    }
                    Some(Delivery::End(_)) | None => taking = false,
                },
                _ = tick.tick() => {
                    self.gauges(&book, true);
                    if book.position() != saved {
                        saved = book.position();
                        self.save(saved).await;
                    }
                }
            }
        }
        // Stop taking new deliveries; let the requests on the wire finish, within the deadline.
        drop(subscription);
        draining.cancel();
        let deadline = tokio::time::sleep(self.settings.shutdown_timeout);
        tokio::pin!(deadline);
        while !in_flight.is_empty() {
            tokio::select! {
                Some((event, outcome)) = in_flight.next() => self.settle(&mut book, &event, outcome),
                () = &mut deadline => break,
            }
        }
        let open = book.open();
        self.gauges(&book, true);
        self.save(book.position()).await;
        if open > 0 {
            if self.state.service.backend().keeps_webhook_positions() {
                info!(
                    "webhook {}: stopped with {open} event(s) undelivered; they are sent after a restart (position {})",
                    self.target.shown,
                    book.position()
                );
            } else {
                self.state
                    .metrics
                    .webhook_lost
                    .with_label_values(&[&self.label])
                    .inc_by(open as u64);
                warn!(
                    "webhook {}: stopped with {open} event(s) undelivered; in memory they are lost (use --data-dir or --redis-url to keep them)",
                    self.target.shown
                );
            }
        }
    }

    /// On Redis: the consumer group is the position. This node delivers while it holds the
    /// URL's lease; on taking it, it first claims what the previous holder left pending.
    async fn run_group(self, group: WebhookGroup) {
        // Only as a wake-up: the hub follows the same stream, so a new event here means there is
        // something to read from the group.
        let mut wake = match self
            .state
            .service
            .subscribe(&Access::Open, None, Resume::Live, HashSet::new())
            .await
        {
            Ok(open) => open.subscription,
            Err(e) => {
                error!("webhook {}: cannot subscribe ({e})", self.target.shown);
                return;
            }
        };
        let mut book = Book::for_group(self.settings.concurrency, WINDOW);
        let draining = CancellationToken::new();
        let mut in_flight = FuturesUnordered::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut leading = false;
        let mut unread = true;
        // Set by a failed read or acknowledgement: this consumer's own pending entries are read
        // again, so none is stranded in its list while it holds the lease.
        let mut recheck = false;
        let mut taking = true;
        while taking {
            // Only the holder sends: after losing the lease, what waits in the book stays pending
            // in Redis for the new holder (sending it here too would race that node's sending of
            // the same task).
            while let Some(event) = leading.then(|| book.next_to_send()).flatten() {
                in_flight.push(self.deliver(event, draining.clone()));
            }
            if leading && recheck && book.has_room() {
                match group.own_pending(WINDOW - book.open().min(WINDOW)).await {
                    Ok(events) => {
                        recheck = false;
                        events.into_iter().for_each(|event| book.take(event));
                        continue;
                    }
                    Err(e) => debug!("webhook {}: {e}", self.target.shown),
                }
            }
            if leading && unread && book.has_room() {
                match group.read(WINDOW - book.open().min(WINDOW)).await {
                    Ok(events) => {
                        unread = !events.is_empty();
                        events.into_iter().for_each(|event| book.take(event));
                        continue;
                    }
                    Err(e) => {
                        warn!("webhook {}: {e}", self.target.shown);
                        unread = false;
                        recheck = true;
                    }
                }
            }
            tokio::select! {
                () = self.stopping.cancelled() => taking = false,
                Some((event, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                    let finished = !matches!(outcome, Outcome::Abandoned);
                    self.settle(&mut book, &event, outcome);
                    if finished {
                        if let Err(e) = group.ack(event.id).await {
                            // Still pending: sent (and acknowledged) again after the recheck.
                            warn!("webhook {}: cannot acknowledge {}: {e}", self.target.shown, event.id);
                            recheck = true;
                        }
                    }
                }
                delivery = wake.next() => match delivery {
                    Some(Delivery::Event(_) | Delivery::Reset { .. } | Delivery::Compacted { .. }) => {
                        unread = true
                    }
                    Some(Delivery::End(_)) | None => taking = false,
                },
                _ = tick.tick() => {
                    self.gauges(&book, false);
                    let held = group.lead().await;
                    match (leading, held) {
                        (false, Ok(true)) => {
                            leading = true;
                            unread = true;
                            if let Err(e) = group.create().await {
                                warn!("webhook {}: {e}", self.target.shown);
                            }
                            match group.claim(WINDOW - book.open().min(WINDOW)).await {
                                Ok(claimed) => {
                                    info!(
                                        "webhook {}: this node ({}) delivers it now; {} pending event(s) taken over",
                                        self.target.shown, group.consumer(), claimed.events.len()
                                    );
                                    if claimed.gone > 0 {
                                        self.state.metrics.webhook_gaps.with_label_values(&[&self.label]).inc();
                                        warn!(
                                            "webhook {}: {} pending event(s) were trimmed from the stream before delivery (raise --buffer)",
                                            self.target.shown, claimed.gone
                                        );
                                    }
                                    claimed.events.into_iter().for_each(|event| book.take(event));
                                }
                                Err(e) => warn!("webhook {}: cannot claim pending entries: {e}", self.target.shown),
                            }
                        }
                        (true, Ok(false)) => {
                            // Another node holds it: what this one has in flight finishes (and is
                            // acknowledged); nothing new is read.
                            leading = false;
                            warn!("webhook {}: lost the lease to another node", self.target.shown);
                        }
                        (_, Err(e)) => debug!("webhook {}: lease: {e}", self.target.shown),
                        _ => {}
                    }
                }
            }
        }
        drop(wake);
        draining.cancel();
        let deadline = tokio::time::sleep(self.settings.shutdown_timeout);
        tokio::pin!(deadline);
        while !in_flight.is_empty() {
            tokio::select! {
                Some((event, outcome)) = in_flight.next() => {
                    let finished = !matches!(outcome, Outcome::Abandoned);
                    self.settle(&mut book, &event, outcome);
                    if finished {
                        let _ = group.ack(event.id).await;
                    }
                }
                () = &mut deadline => break,
            }
        }
        group.release().await;
        let open = book.open();
        if open > 0 {
            info!(
                "webhook {}: stopped with {open} event(s) undelivered; they stay pending in Redis for the next node",
                self.target.shown
            );
        }
    }

    fn settle(&self, book: &mut Book, event: &Event, outcome: Outcome) {
        match outcome {
            Outcome::Delivered | Outcome::DeadLettered => book.finish(event),
            Outcome::Abandoned => book.abandon(),
        }
    }

    async fn save(&self, position: EventId) {
        let saved = self
            .state
            .service
            .backend()
            .save_webhook_position(&self.target.key, position)
            .await;
        if let Err(e) = saved {
            // Not fatal: the older stored position means more events are sent again.
            warn!(
                "webhook {}: cannot store its position {position}: {e}",
                self.target.shown
            );
        }
    }

    /// `count_unread`: add the events published and not read yet, from the ids (in memory and on
    /// SQLite ids of one log share their first group and the second counts events; Redis ids
    /// count milliseconds, so there the backlog is what the worker holds).
    fn gauges(&self, book: &Book, count_unread: bool) {
        let metrics = &self.state.metrics;
        let newest = self.state.hub().head();
        let taken = book.newest_taken();
        let unread = if count_unread && newest.epoch == taken.epoch {
            newest.seq.saturating_sub(taken.seq)
        } else {
            0
        };
        metrics
            .webhook_backlog
            .with_label_values(&[&self.label])
            .set((book.open() as u64 + unread) as i64);
        metrics
            .webhook_oldest_seconds
            .with_label_values(&[&self.label])
            .set(book.oldest().map_or(0, |at| at.elapsed().as_secs()) as i64);
    }

    /// Sends `event` until a 2xx answer, or until `--webhook-max-age` after its first attempt.
    fn deliver(
        &self,
        event: Arc<Event>,
        draining: CancellationToken,
    ) -> impl std::future::Future<Output = (Arc<Event>, Outcome)> + 'static {
        let settings = self.settings.clone();
        let target = self.target.clone();
        let metrics = self.state.metrics.clone();
        let label = self.label.clone();
        async move {
            let first = Instant::now();
            let id = event.id.to_string();
            let mut attempt: u32 = 0;
            loop {
                attempt += 1;
                let failure = match send(&settings, &target, &id, &event).await {
                    Ok(()) => {
                        metrics
                            .webhook_deliveries
                            .with_label_values(&[&label])
                            .inc();
                        return (event, Outcome::Delivered);
                    }
                    Err(failure) => failure,
                };
                metrics
                    .webhook_failed_attempts
                    .with_label_values(&[&label])
                    .inc();
                let delay = backoff(settings.backoff, attempt);
                if first.elapsed() + delay > settings.max_age {
                    metrics
                        .webhook_dead_letters
                        .with_label_values(&[&label])
                        .inc();
                    warn!(
                        "webhook {}: event {id} (task {}) dead-lettered after {attempt} attempt(s) over {:?}: {failure}",
                        target.shown, event.task_id, first.elapsed()
                    );
                    return (event, Outcome::DeadLettered);
                }
                debug!(
                    "webhook {}: event {id} attempt {attempt} failed ({failure}); retrying in {delay:?}",
                    target.shown
                );
                metrics.webhook_retries.with_label_values(&[&label]).inc();
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = draining.cancelled() => return (event, Outcome::Abandoned),
                }
            }
        }
    }
}

/// One attempt. The error names what went wrong without the URL (which may hold a credential).
async fn send(settings: &Settings, target: &Target, id: &str, event: &Event) -> Result<(), String> {
    // Before 1970 is not a clock a signature can be checked against anyway.
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let mut request = settings
        .client
        .post(target.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(signer) = &settings.signer {
        request = request.header("webhook-signature", signer.sign(id, timestamp, &event.data));
    }
    let mut answer = request
        .body(event.data.clone())
        .send()
        .await
        .map_err(describe)?;
    let status = answer.status();
    // Read a short answer to its end so the connection goes back to the pool.
    let mut read = 0;
    while read <= MAX_ANSWER_BYTES {
        match answer.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => break,
        }
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

fn describe(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "no answer in time"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    // `without_url`: reqwest's message would otherwise repeat the whole URL.
    let error = error.without_url();
    match std::error::Error::source(&error) {
        Some(source) => format!("{kind}: {error}: {source}"),
        None => format!("{kind}: {error}"),
    }
}

/// The wait before retry number `attempt` (1 for the first): `base` doubling each time up to
/// `MAX_BACKOFF_FACTOR` times it, each drawn from 75 % to 125 % so receivers that came back are
/// not hit by every worker in the same instant.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let factor = 2u32
        .saturating_pow(attempt.saturating_sub(1))
        .min(MAX_BACKOFF_FACTOR);
    base * factor / 4 * 3 + (base * factor / 2).mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap() {
        let base = Duration::from_secs(1);
        let first = backoff(base, 1);
        assert!(first >= Duration::from_millis(750) && first <= Duration::from_millis(1250));
        let fourth = backoff(base, 4);
        assert!(fourth >= Duration::from_secs(6) && fourth <= Duration::from_secs(10));
        let late = backoff(base, 40);
        assert!(late >= Duration::from_secs(450) && late <= Duration::from_secs(750));
        let draws: HashSet<_> = (0..20).map(|_| backoff(base, 3)).collect();
        assert!(draws.len() > 1, "the delays are jittered");
    }
}
