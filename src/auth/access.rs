//! `Access`: what one request may do, and `Denied`, why not.

use super::Grant;
use crate::filter::{Patterns, TaskFilter};
use crate::task::TaskId;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A refusal by auth, for the transport to answer in its own way (401/403, close 1008).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No token, or one that is malformed, expired or wrongly signed. `invalid_token` tells a
    /// client with a token that it must get a new one (RFC 6750's `error="invalid_token"`).
    #[error("{message}")]
    Unauthenticated {
        message: String,
        invalid_token: bool,
    },
    /// A valid token that does not allow this.
    #[error("{0}")]
    Forbidden(String),
}

/// What the request may do: everything when auth is off, else what its token grants.
#[derive(Debug, Clone)]
pub enum Access {
    Open,
    Token(Arc<Grant>),
}

impl Access {
    pub fn subject(&self) -> Option<&str> {
        match self {
            Access::Token(grant) if !grant.subject.is_empty() => Some(&grant.subject),
            _ => None,
        }
    }

    /// `POST /update_task` and `DELETE /tasks/{id}` on this task.
    pub fn check_publish(&self, task_id: &TaskId) -> Result<(), Denied> {
        match self {
            Access::Token(grant) if !grant.publish.matches(task_id) => Err(Denied::Forbidden(
                format!("the token may not publish to task_id {task_id}"),
            )),
            _ => Ok(()),
        }
    }

    /// Reading anything at all (`/events`, `GET /tasks`): a token without subscribe rights gets
    /// a clear 403 rather than an empty stream that never says why.
    pub fn check_subscribe_any(&self) -> Result<(), Denied> {
        match self {
            Access::Token(grant) if grant.subscribe.is_empty() => Err(Denied::Forbidden(
                "the token has no subscribe rights".into(),
            )),
            _ => Ok(()),
        }
    }

    pub fn check_subscribe(&self, task_id: &TaskId) -> Result<(), Denied> {
        if self.may_see(task_id) {
            Ok(())
        } else {
            Err(Denied::Forbidden(format!(
                "the token may not subscribe to task_id {task_id}"
            )))
        }
    }

    pub fn may_see(&self, task_id: &TaskId) -> bool {
        match self {
            Access::Open => true,
            Access::Token(grant) => grant.subscribe.matches(task_id),
        }
    }

    /// The subscribe patterns for the hub's filter; `None` when auth is off.
    pub fn subscribe_patterns(&self) -> Option<Patterns> {
        match self {
            Access::Open => None,
            Access::Token(grant) => Some(grant.subscribe.clone()),
        }
    }

    pub fn expires_at(&self) -> Option<SystemTime> {
        match self {
            Access::Open => None,
            Access::Token(grant) => Some(grant.expires_at),
        }
    }

    /// The filter for a subscription on any transport: the requested ids (`?task_id=`, empty for
    /// all) within what the token may see, until it expires. Asking for a task the token may
    /// not see is a 403 rather than a stream that stays silent.
    pub fn task_filter(&self, ids: HashSet<TaskId>) -> Result<TaskFilter, Denied> {
        self.check_subscribe_any()?;
        for id in &ids {
            self.check_subscribe(id)?;
        }
        let until = self.expires_at().map(|expires| {
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::Instant::now() + left
        });
        Ok(TaskFilter {
            patterns: self.subscribe_patterns(),
            until,
            ..TaskFilter::ids(ids)
        })
    }

    /// Who is asking, for scoping what is remembered per caller (idempotency keys): the token's
    /// `sub`, or for a token without one its rights (tokens with the same rights can do the same
    /// things anyway); empty when auth is off.
    pub fn identity(&self) -> String {
        match self {
            Access::Open => String::new(),
            Access::Token(grant) if !grant.subject.is_empty() => format!("sub:{}", grant.subject),
            Access::Token(grant) => format!("rights:{:?}/{:?}", grant.publish, grant.subscribe),
        }
    }
}
