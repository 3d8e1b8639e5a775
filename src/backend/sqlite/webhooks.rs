//! The webhook positions (schema version 2's `webhooks` table), on a connection of their own.

use super::{schema, BackendError, Shared, SqliteBackend};
use crate::event::EventId;
use rusqlite::{Connection, OptionalExtension};
use std::sync::{Arc, Mutex};

/// The connection, opened at the first use (most databases never see a webhook), with the
/// `--synchronous` of the others.
pub(crate) struct Positions {
    conn: Arc<Mutex<Option<Connection>>>,
    synchronous: &'static str,
}

impl Positions {
    pub(crate) fn new(synchronous: &'static str) -> Positions {
        Positions {
            conn: Arc::default(),
            synchronous,
        }
    }
}

impl SqliteBackend {
    pub async fn webhook_position(&self, key: &str) -> Result<Option<EventId>, BackendError> {
        let key = key.to_owned();
        self.with_positions(move |conn| {
            let text: Option<String> = conn
                .query_row(
                    "SELECT position FROM webhooks WHERE key = ?1",
                    [&key],
                    |r| r.get(0),
                )
                .optional()?;
            text.map(|text| {
                text.parse()
                    .map_err(|_| schema::damaged(format!("webhook position {text:?}")))
            })
            .transpose()
        })
        .await
    }

    pub async fn save_webhook_position(
        &self,
        key: &str,
        position: EventId,
    ) -> Result<(), BackendError> {
        let key = key.to_owned();
        let shared = self.shared.clone();
        self.with_positions(move |conn| {
            // The writer's and the housekeeper's lock: waiting here is cheaper than in SQLite's
            // busy handler, which polls.
            let _write = shared.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            conn.execute(
                "INSERT INTO webhooks (key, position) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET position = excluded.position",
                [&key, &position.to_string()],
            )
            .map(|_| ())
        })
        .await
    }

    async fn with_positions<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, BackendError> {
        let positions = self.webhook_positions.conn.clone();
        let synchronous = self.webhook_positions.synchronous;
        let shared: Arc<Shared> = self.shared.clone();
        let unavailable = |e: String| BackendError::Unavailable(format!("webhook positions: {e}"));
        tokio::task::spawn_blocking(move || {
            let mut guard = positions.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                let conn = Connection::open(&shared.path)?;
                schema::configure(&conn, synchronous)?;
                *guard = Some(conn);
            }
            // Set just above.
            work(guard.as_ref().expect("opened above"))
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(|e| unavailable(e.to_string()))
    }
}
