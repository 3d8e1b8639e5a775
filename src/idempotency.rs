//! Idempotency keys: what a client may send, and the scope a key is remembered in.

use crate::auth::Access;
use crate::task::TaskId;

#[derive(Debug, thiserror::Error)]
#[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
pub struct InvalidIdempotencyKey;

/// A key as the client sent it, checked: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// From the HTTP header or a WebSocket message's `idempotency_key` alike.
    pub fn parse(raw: &str) -> Result<IdempotencyKey, InvalidIdempotencyKey> {
        let valid = (1..=255).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic());
        valid
            .then(|| IdempotencyKey(raw.to_owned()))
            .ok_or(InvalidIdempotencyKey)
    }

    /// The key as the store remembers it: per token identity and per task, so a key reused by
    /// another token, or for another task, never replays an answer its caller may not see; it is
    /// a new publish instead. Keys are visible ASCII, so the newlines cannot be forged.
    pub fn scoped(&self, access: &Access, task_id: &TaskId) -> String {
        format!("{}\n{task_id}\n{}", access.identity(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_1_to_255_bytes() {
        assert!(IdempotencyKey::parse("order-42:retry").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        for bad in ["", " ", "a b", "ä", "a\n", &"k".repeat(256)] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn scopes_differ_by_task_and_by_caller() {
        let key = IdempotencyKey::parse("k").unwrap();
        let open = Access::Open;
        assert_ne!(
            key.scoped(&open, &TaskId::Number(1)),
            key.scoped(&open, &TaskId::Number(2))
        );
    }
}
