//! Graceful shutdown. Every accept loop and connection holds a [`Drain`]; the
//! [`Drainer`] signals them all, then waits until every holder is gone or the
//! grace period has passed.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone)]
pub struct Drain {
    rx: watch::Receiver<bool>,
    _held: Arc<()>,
}

impl Drain {
    /// Resolves when draining starts.
    pub async fn signaled(&mut self) {
        let _ = self.rx.wait_for(|d| *d).await;
    }
}

pub struct Drainer {
    tx: watch::Sender<bool>,
    held: Arc<()>,
}

impl Drainer {
    pub fn new() -> (Drainer, Drain) {
        let (tx, rx) = watch::channel(false);
        let held = Arc::new(());
        let drain = Drain {
            rx,
            _held: held.clone(),
        };
        (Drainer { tx, held }, drain)
    }

    /// Signals every holder and waits up to `grace` for them to finish.
    /// Returns how many were still running when the grace period ended.
    pub async fn drain(self, grace: Duration) -> usize {
        let _ = self.tx.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let open = Arc::strong_count(&self.held) - 1;
            if open == 0 {
                return 0;
            }
            if tokio::time::Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_holders_then_gives_up_after_grace() {
        let (drainer, drain) = Drainer::new();
        let mut quick = drain.clone();
        tokio::spawn(async move {
            quick.signaled().await;
        });
        let stuck = drain.clone();
        drop(drain);
        let left = drainer.drain(Duration::from_millis(100)).await;
        assert_eq!(left, 1, "the stuck holder outlived the grace period");
        drop(stuck);
    }

    #[tokio::test]
    async fn returns_at_once_when_all_finish() {
        let (drainer, drain) = Drainer::new();
        let mut d = drain.clone();
        drop(drain);
        tokio::spawn(async move {
            d.signaled().await;
        });
        let start = tokio::time::Instant::now();
        assert_eq!(drainer.drain(Duration::from_secs(5)).await, 0);
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
