//! The signal the store gives when appended records become readable.

use std::sync::atomic::{AtomicBool, Ordering, fence};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// Wakes the tasks waiting for appended records to become readable (the
/// replication streams to the slaves). Waking takes a lock, which every
/// append would pay; it is skipped while nobody has asked for a wake-up
/// since the last one, so a store without streams pays one atomic load per
/// append.
#[derive(Default)]
pub struct PublishSignal {
    notify: Notify,
    /// Set when a waiter asked, cleared by the wake-up that served it.
    armed: AtomicBool,
}

impl PublishSignal {
    /// A future that completes at the first publish after this call, even
    /// if it is polled only later (the pattern: take it, check what is
    /// published, then await it).
    pub fn notified(&self) -> Notified<'_> {
        let notified = self.notify.notified();
        self.armed.store(true, Ordering::Relaxed);
        // Pairs with the fence in `notify`: either that call sees the flag,
        // or what it published is visible to the check after this one.
        fence(Ordering::SeqCst);
        notified
    }

    /// Wakes the waiters, if any asked since the last wake-up; called after
    /// the new end is published.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::Relaxed) {
            self.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_waiter_taken_before_a_publish_is_woken_even_unpolled() {
        let sig = PublishSignal::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let (a, b) = (sig.notified(), sig.notified());
        sig.notify();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                a.await;
                b.await;
            })
            .await
            .expect("both woken");
        });
        // Nobody asked since: nothing is pending, and the next waiter waits
        // for the next publish.
        assert!(!sig.armed.load(Ordering::SeqCst));
        let c = sig.notified();
        let missed =
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(50), c).await });
        assert!(missed.is_err(), "woken without a publish");
    }

    /// A publisher and a waiter in lock step: the publisher publishes `k`
    /// and waits until the waiter has seen it. A lost wake-up leaves the
    /// waiter asleep and fails the bounded wait.
    #[test]
    fn no_wake_up_is_lost_between_the_check_and_the_wait() {
        const ROUNDS: u64 = 20_000;
        let sig = Arc::new(PublishSignal::default());
        let published = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(AtomicU64::new(0));
        let publisher = {
            let (sig, published, seen) = (sig.clone(), published.clone(), seen.clone());
            std::thread::spawn(move || {
                for k in 1..=ROUNDS {
                    published.store(k, Ordering::Release);
                    sig.notify();
                    while seen.load(Ordering::Acquire) < k {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut k = 0;
            while k < ROUNDS {
                let notified = sig.notified();
                let now = published.load(Ordering::Acquire);
                if now > k {
                    k = now;
                    seen.store(k, Ordering::Release);
                    continue;
                }
                tokio::time::timeout(Duration::from_secs(10), notified)
                    .await
                    .unwrap_or_else(|_| panic!("no wake-up for publish {}", k + 1));
            }
        });
        publisher.join().expect("publisher");
    }
}
