//! Webhook delivery on Redis: a consumer group per URL on the event stream, so the cluster as a
//! whole delivers each event once, and a lease so that one node at a time delivers a URL (per-task
//! order across nodes); a node that takes the lease over claims the pending entries of the one
//! before it (`XAUTOCLAIM`), so a dead node's deliveries are not lost.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | group `webhook:<sha256 of the URL>` on `{taskstream}:events` | consumer group | what was handed out (`XREADGROUP`) and not yet acknowledged (`XACK`) |
//! | `{taskstream}:webhook:<sha256>:lease` | string with a TTL | the consumer name of the node that delivers this URL |

use super::reader::entries;
use super::scripts::STREAM_KEY;
use super::store::Store;
use super::RedisBackend;
use crate::backend::BackendError;
use crate::event::{Event, EventId};
use redis::{Script, Value};
use std::sync::Arc;
use std::time::Duration;

/// Takes the lease if it is free, or extends it if this node holds it: answers 1 when held.
const LEASE_LUA: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Gives the lease back if this node holds it (a clean shutdown: the next node needs not wait).
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

pub struct WebhookGroup {
    store: Arc<Store>,
    group: String,
    lease_key: String,
    consumer: String,
    lease: Duration,
}

/// What a claim of the previous holder's pending entries found.
pub struct Claimed {
    pub events: Vec<Arc<Event>>,
    /// Pending ids whose entries the stream's trimming removed: they cannot be delivered.
    pub gone: usize,
}

impl RedisBackend {
    /// The consumer group of the webhook `key` (the SHA-256 of its URL), seen from this node.
    pub fn webhook_group(&self, key: &str, lease: Duration) -> WebhookGroup {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        WebhookGroup {
            store: self.store.clone(),
            group: format!("webhook:{key}"),
            lease_key: format!("{{taskstream}}:webhook:{key}:lease"),
            // Unique per process: a restarted node is a new consumer, and claims what the old one
            // left pending like any other node would.
            consumer: format!("node-{}-{nanos:08x}", std::process::id()),
            lease,
        }
    }
}

impl WebhookGroup {
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    fn failed(e: String) -> BackendError {
        BackendError::Unavailable(format!("Redis: {e}"))
    }

    /// Takes or extends the lease; answers whether this node delivers the URL now. The group is
    /// created (at the stream's end) the first time any node leads it.
    pub async fn lead(&self) -> Result<bool, BackendError> {
        let mut conn = self.store.conn.clone();
        let script = Script::new(LEASE_LUA);
        let mut invocation = script.key(&self.lease_key);
        invocation
            .arg(&self.consumer)
            .arg(self.lease.as_millis() as u64);
        let held: i64 = self
            .store
            .within_timeout(invocation.invoke_async(&mut conn))
            .await
            .map_err(Self::failed)?;
        Ok(held == 1)
    }

    pub async fn create(&self) -> Result<(), BackendError> {
        let mut conn = self.store.conn.clone();
        let mut create = redis::cmd("XGROUP");
        create
            .arg("CREATE")
            .arg(STREAM_KEY)
            .arg(&self.group)
            .arg("$")
            .arg("MKSTREAM");
        match self
            .store
            .within_timeout(create.query_async::<Value>(&mut conn))
            .await
        {
            Ok(_) => Ok(()),
            // Another node (or an earlier run) created it: its position is the one to keep.
            Err(e) if e.contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(Self::failed(e)),
        }
    }

    pub async fn release(&self) {
        let mut conn = self.store.conn.clone();
        let script = Script::new(RELEASE_LUA);
        let mut invocation = script.key(&self.lease_key);
        invocation.arg(&self.consumer);
        let _ = self
            .store
            .within_timeout(invocation.invoke_async::<i64>(&mut conn))
            .await;
    }

    /// Claims every pending entry of the group (the previous holder's, dead or not: it lost the
    /// lease), up to `max`, oldest first.
    pub async fn claim(&self, max: usize) -> Result<Claimed, BackendError> {
        let mut claimed = Claimed {
            events: Vec::new(),
            gone: 0,
        };
        let mut cursor = "0-0".to_owned();
        loop {
            let room = max.saturating_sub(claimed.events.len());
            if room == 0 {
                return Ok(claimed);
            }
            let mut conn = self.store.conn.clone();
            let mut command = redis::cmd("XAUTOCLAIM");
            command
                .arg(STREAM_KEY)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(room.min(super::scripts::PAGE));
            let reply: Value = self
                .store
                .within_timeout(command.query_async(&mut conn))
                .await
                .map_err(Self::failed)?;
            let Value::Array(parts) = reply else {
                return Err(Self::failed("XAUTOCLAIM answered no array".into()));
            };
            let next = super::store::text(parts.first())
                .and_then(|t| std::str::from_utf8(t).ok())
                .unwrap_or("0-0")
                .to_owned();
            for entry in entries(parts.get(1)) {
                match entry.event {
                    Some(event) => claimed.events.push(event),
                    None => self.drop_damaged(entry.id).await,
                }
            }
            // Redis 7 lists the pending ids whose entries were trimmed, and drops them itself.
            if let Some(Value::Array(deleted)) = parts.get(2) {
                claimed.gone += deleted.len();
            }
            if next == "0-0" {
                return Ok(claimed);
            }
            cursor = next;
        }
    }

    /// New entries for this consumer, at most `max`, without waiting (the caller is woken by its
    /// node's hub, which follows the same stream).
    pub async fn read(&self, max: usize) -> Result<Vec<Arc<Event>>, BackendError> {
        self.read_from(">", max).await.map(|(events, _)| events)
    }

    /// This consumer's own pending entries, oldest first, at most `max`: after a failed read or
    /// acknowledgement. An `XREADGROUP` whose answer was lost on the way still handed its entries
    /// to this consumer, and nothing else would ever send them while this node holds the lease.
    pub async fn own_pending(&self, max: usize) -> Result<Vec<Arc<Event>>, BackendError> {
        let mut all = Vec::new();
        let mut after = "0-0".to_owned();
        while all.len() < max {
            let (events, last) = self.read_from(&after, max - all.len()).await?;
            all.extend(events);
            match last {
                Some(last) => after = last.to_string(),
                None => break,
            }
        }
        Ok(all)
    }

    /// `XREADGROUP` from `id` (`>`: new entries; an id: this consumer's pending ones after it);
    /// answers the events and the last id of the page (`None` when it was empty).
    async fn read_from(
        &self,
        id: &str,
        max: usize,
    ) -> Result<(Vec<Arc<Event>>, Option<EventId>), BackendError> {
        let mut conn = self.store.conn.clone();
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(max.clamp(1, super::scripts::PAGE))
            .arg("STREAMS")
            .arg(STREAM_KEY)
            .arg(id);
        let reply: Value = self
            .store
            .within_timeout(command.query_async(&mut conn))
            .await
            .map_err(Self::failed)?;
        // `[[stream, [entries...]]]`, or nil when there is nothing new.
        let Value::Array(streams) = reply else {
            return Ok((Vec::new(), None));
        };
        let Some(Value::Array(stream)) = streams.first() else {
            return Ok((Vec::new(), None));
        };
        let mut events = Vec::new();
        let mut last = None;
        for entry in entries(stream.get(1)) {
            last = Some(entry.id);
            match entry.event {
                Some(event) => events.push(event),
                None => self.drop_damaged(entry.id).await,
            }
        }
        Ok((events, last))
    }

    /// An entry that cannot be rebuilt as an event (logged by `entries`) can never be delivered:
    /// acknowledged, so it does not stay pending and come back at every takeover.
    async fn drop_damaged(&self, id: EventId) {
        let _ = self.ack(id).await;
    }

    /// The event is finished (delivered or dead-lettered) for this URL, cluster-wide.
    pub async fn ack(&self, id: EventId) -> Result<(), BackendError> {
        let mut conn = self.store.conn.clone();
        let mut command = redis::cmd("XACK");
        command.arg(STREAM_KEY).arg(&self.group).arg(id.to_string());
        self.store
            .within_timeout(command.query_async::<i64>(&mut conn))
            .await
            .map(|_| ())
            .map_err(Self::failed)
    }
}
