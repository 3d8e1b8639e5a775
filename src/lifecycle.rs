//! The owner of background work: every task the process runs besides serving requests (the Redis
//! stream reader, the limiter's cleanup, the webhook workers, the durable store's writer) is
//! spawned here and joined, with a deadline, on shutdown.

use log::{info, warn};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Lifecycle {
    stopping: CancellationToken,
    tasks: TaskTracker,
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle::default()
    }

    /// Cancelled when the process starts to stop: background tasks end their loops on it.
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Runs `task` in the background until it ends; `stop` waits for it.
    pub fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(async move {
            task.await;
            info!("{name} stopped");
        });
    }

    /// Tells every background task to stop and waits for them, at most `within`.
    pub async fn stop(&self, within: Duration) {
        self.stopping.cancel();
        self.tasks.close();
        if tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                "{} background task(s) did not stop within {within:?}",
                self.tasks.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_cancels_and_joins_every_task() {
        let lifecycle = Lifecycle::new();
        let (done, mut finished) = tokio::sync::mpsc::channel::<()>(2);
        for _ in 0..2 {
            let stopping = lifecycle.stopping();
            let done = done.clone();
            lifecycle.spawn("test task", async move {
                stopping.cancelled().await;
                let _ = done.send(()).await;
            });
        }
        drop(done);
        lifecycle.stop(Duration::from_secs(5)).await;
        assert!(finished.recv().await.is_some());
        assert!(finished.recv().await.is_some());
        assert!(
            finished.recv().await.is_none(),
            "both ended before stop returned"
        );
    }
}
