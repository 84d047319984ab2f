//! The push throttle (istiod's `PILOT_PUSH_THROTTLE`): at most [`PUSH_CONCURRENCY`] streams have
//! responses the client has not answered yet. A full response to a proxy of a large mesh is
//! megabytes, built and encoded per client; without a bound, a push to a thousand proxies holds a
//! thousand of them at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Streams that may have unanswered responses at once (istiod's default).
pub const PUSH_CONCURRENCY: usize = 100;

/// How long a client may leave responses unanswered before its slot is given back anyway, so a
/// silent client cannot hold one.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One stream's slot: taken before it sends while it holds none, given back once the client has
/// answered (ACK or NACK) every response sent, or after [`ANSWER_TIMEOUT`].
#[derive(Default)]
pub(crate) struct InFlight {
    slot: Option<(OwnedSemaphorePermit, Instant)>,
    unanswered: HashSet<String>,
}

impl InFlight {
    /// Waits for a slot unless the stream holds one. A stream never waits while holding a slot,
    /// so streams cannot deadlock on each other.
    pub async fn acquire(&mut self, slots: &Arc<Semaphore>) {
        if self.slot.is_none() {
            let permit = slots.clone().acquire_owned().await.expect("the push semaphore is never closed");
            self.slot = Some((permit, Instant::now()));
        }
    }

    /// Records a response sent with `nonce`.
    pub fn sent(&mut self, nonce: &str) {
        self.unanswered.insert(nonce.to_string());
    }

    /// Records the client's answer to `nonce`; frees the slot when nothing is left unanswered.
    pub fn answered(&mut self, nonce: &str) {
        self.unanswered.remove(nonce);
        if self.unanswered.is_empty() {
            self.slot = None;
        }
    }

    /// When the slot is given back regardless of answers (None without a slot).
    pub fn deadline(&self) -> Option<Instant> {
        self.slot.as_ref().map(|(_, taken)| *taken + ANSWER_TIMEOUT)
    }

    /// Gives the slot back (the client was too slow to answer).
    pub fn expire(&mut self) {
        self.slot = None;
        self.unanswered.clear();
    }

    /// Resolves at [`InFlight::deadline`], never without a slot.
    pub async fn expired(deadline: Option<Instant>) {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slot_is_held_until_every_response_is_answered_or_the_timeout() {
        let slots = Arc::new(Semaphore::new(1));
        let mut a = InFlight::default();
        a.acquire(&slots).await;
        a.sent("1");
        a.acquire(&slots).await; // holds one already: no wait
        a.sent("2");
        assert_eq!(slots.available_permits(), 0);
        a.answered("1");
        assert_eq!(slots.available_permits(), 0, "one response still unanswered");
        a.answered("2");
        assert_eq!(slots.available_permits(), 1);
        let mut b = InFlight::default();
        b.acquire(&slots).await;
        b.sent("1");
        let deadline = b.deadline().expect("a deadline while holding a slot");
        assert!(deadline > Instant::now() + ANSWER_TIMEOUT / 2);
        b.expire();
        assert_eq!(b.deadline(), None);
        assert_eq!(slots.available_permits(), 1, "a silent client gives its slot back");
    }
}
