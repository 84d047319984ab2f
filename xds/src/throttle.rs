//! The push throttle (istiod's `PILOT_PUSH_THROTTLE`): at most [`PUSH_CONCURRENCY`] streams per
//! lane have responses the client has not answered yet; clients not known to answer wait in a
//! lane of their own, so they never delay the ones that do. A full response to a proxy of a large mesh is
//! megabytes, built and encoded per client; without a bound, a push to a thousand proxies holds a
//! thousand of them at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Streams that may have unanswered responses at once (istiod's default), in each lane.
pub const PUSH_CONCURRENCY: usize = 100;

/// How long a client that has answered before may leave responses unanswered before its slot is
/// given back anyway, so a silent client cannot hold one.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The same for a client that has never answered, or that let its last slot expire: it waits in
/// the probation lane and holds a slot there only this long.
pub const PROBATION_TIMEOUT: Duration = Duration::from_secs(1);

/// The two lanes of push slots. Clients that answer their responses push in the main lane;
/// clients that have not answered yet, or went silent, push in the probation lane. Silent
/// clients, however many, then never delay a healthy proxy's push: they wait behind each other.
pub struct Lanes {
    /// Clients that answer.
    pub main: Arc<Semaphore>,
    /// Clients not (or no longer) known to answer.
    pub probation: Arc<Semaphore>,
}

impl Default for Lanes {
    fn default() -> Self {
        Self { main: Arc::new(Semaphore::new(PUSH_CONCURRENCY)), probation: Arc::new(Semaphore::new(PUSH_CONCURRENCY)) }
    }
}

impl Lanes {
    /// Free slots: (main, probation).
    pub fn available(&self) -> (usize, usize) {
        (self.main.available_permits(), self.probation.available_permits())
    }
}

/// One stream's slot: taken before it sends while it holds none, given back once the client has
/// answered (ACK or NACK) every response sent, or after its lane's timeout.
#[derive(Default)]
pub(crate) struct InFlight {
    slot: Option<(OwnedSemaphorePermit, Instant)>,
    unanswered: HashSet<String>,
    /// The client answered a response, and has not let a slot expire since.
    answers: bool,
}

impl InFlight {
    /// Waits for a slot in this stream's lane unless it holds one. A stream never waits while
    /// holding a slot, so streams cannot deadlock on each other.
    pub async fn acquire(&mut self, lanes: &Lanes) {
        if self.slot.is_none() {
            let lane = if self.answers { &lanes.main } else { &lanes.probation };
            let permit = lane.clone().acquire_owned().await.expect("the push semaphore is never closed");
            self.slot = Some((permit, Instant::now()));
        }
    }

    /// Records a response sent with `nonce`.
    pub fn sent(&mut self, nonce: &str) {
        self.unanswered.insert(nonce.to_string());
    }

    /// Records the client's answer to `nonce`; frees the slot when nothing is left unanswered.
    pub fn answered(&mut self, nonce: &str) {
        if self.unanswered.remove(nonce) {
            self.answers = true;
        }
        if self.unanswered.is_empty() {
            self.slot = None;
        }
    }

    /// When the slot is given back regardless of answers (None without a slot).
    pub fn deadline(&self) -> Option<Instant> {
        let timeout = if self.answers { ANSWER_TIMEOUT } else { PROBATION_TIMEOUT };
        self.slot.as_ref().map(|(_, taken)| *taken + timeout)
    }

    /// Gives the slot back (the client was too slow to answer): its next pushes wait in the
    /// probation lane until it answers again.
    pub fn expire(&mut self) {
        self.slot = None;
        self.unanswered.clear();
        self.answers = false;
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
        let lanes = Lanes::default();
        let mut a = InFlight::default();
        a.acquire(&lanes).await;
        assert_eq!(lanes.available(), (PUSH_CONCURRENCY, PUSH_CONCURRENCY - 1), "a new client is on probation");
        a.sent("1");
        a.acquire(&lanes).await; // holds one already: no wait
        a.sent("2");
        a.answered("1");
        assert_eq!(lanes.available().1, PUSH_CONCURRENCY - 1, "one response still unanswered");
        a.answered("2");
        assert_eq!(lanes.available(), (PUSH_CONCURRENCY, PUSH_CONCURRENCY));
        // It answered: its next push takes a main slot, with the longer timeout.
        a.acquire(&lanes).await;
        assert_eq!(lanes.available(), (PUSH_CONCURRENCY - 1, PUSH_CONCURRENCY));
        a.sent("3");
        assert!(a.deadline().expect("a deadline while holding a slot") > Instant::now() + PROBATION_TIMEOUT);
        // It goes silent: the slot comes back and the client is on probation again.
        a.expire();
        assert_eq!(a.deadline(), None);
        assert_eq!(lanes.available(), (PUSH_CONCURRENCY, PUSH_CONCURRENCY), "a silent client gives its slot back");
        a.acquire(&lanes).await;
        assert_eq!(lanes.available(), (PUSH_CONCURRENCY, PUSH_CONCURRENCY - 1));
        assert!(a.deadline().unwrap() <= Instant::now() + PROBATION_TIMEOUT);
    }
}
