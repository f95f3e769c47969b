//! What the guardrails' one door hands back: a call that may reach OpenAI, with its budget
//! reservation (the exact prompt plus the answer tokens granted) and the output cap to send.
//! Whoever ends the call settles it:
//! - `settle` with the real usage;
//! - `release` only when the upstream provably did not process the request (a refused
//!   connection, a 4xx answer);
//! - anything else is ambiguous (a timeout, a 5xx, a cut connection, a client gone): the
//!   upstream may have billed it. A whole answer then keeps its whole reservation; a stream
//!   settles what was seen, the prompt plus the streamed text (counted in bytes, an upper bound
//!   of its tokens), never more than was reserved.
//!
//! Dropped unsettled (a client went away, the handler was cancelled), it does the same: a
//! stream's estimate settles on a task of the application's tracker, which shutdown waits for.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use super::budget::{Accounts, Budgets, Reservation};
use crate::domain::TokenUsage;

pub struct Admission {
    budgets: Arc<Budgets>,
    /// Whom the call is charged to (a failover's next attempt is charged to the same).
    accounts: Accounts,
    /// `None` once settled, or when no budget is set (nothing to settle).
    reservation: Option<Reservation>,
    tasks: TaskTracker,
    prompt_tokens: u64,
    /// The output cap for this call (`None`: none is sent).
    output_cap: Option<u64>,
    /// A stream: bytes of answer text seen so far (`None` for a whole answer).
    streamed_bytes: Option<u64>,
    /// History turns dropped to fit the model's context window.
    pub history_trimmed: usize,
}

impl Admission {
    pub(super) fn new(
        budgets: Arc<Budgets>,
        accounts: Accounts,
        reservation: Reservation,
        tasks: TaskTracker,
        prompt_tokens: u64,
        output_cap: Option<u64>,
        stream: bool,
    ) -> Self {
        Self {
            budgets,
            accounts,
            reservation: Some(reservation).filter(|r| !r.is_empty()),
            tasks,
            prompt_tokens,
            output_cap,
            streamed_bytes: stream.then_some(0),
            history_trimmed: 0,
        }
    }

    /// The most answer tokens this call may produce: send it upstream.
    pub fn output_cap(&self) -> Option<u32> {
        self.output_cap
            .map(|cap| u32::try_from(cap).unwrap_or(u32::MAX))
    }

    /// The prompt's tokens, as counted before the call (0 when nothing needed counting).
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens
    }

    /// Whom the call is charged to.
    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    pub fn is_stream(&self) -> bool {
        self.streamed_bytes.is_some()
    }

    /// The call may have been billed whole and another attempt follows: this reservation stays
    /// as it is.
    pub fn keep(mut self) {
        self.reservation = None;
    }

    /// The answer streamed so far has `bytes` bytes of text.
    pub fn streamed(&mut self, bytes: usize) {
        if let Some(seen) = &mut self.streamed_bytes {
            *seen = bytes as u64;
        }
    }

    /// What a stream cut short is counted as: the prompt plus the text seen, at most the cap.
    pub fn estimate(&self) -> TokenUsage {
        let seen = self.streamed_bytes.unwrap_or(0);
        let completion = self.output_cap.map_or(seen, |cap| seen.min(cap));
        TokenUsage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            total_tokens: self.prompt_tokens + completion,
            cached_tokens: 0,
        }
    }

    /// The call used `actual`: the reservation becomes that.
    pub async fn settle(mut self, actual: &TokenUsage) {
        if let Some(reservation) = self.reservation.take() {
            self.budgets.settle(reservation, actual).await;
        }
    }

    /// The upstream provably did not process the request: nothing was spent.
    pub async fn release(self) {
        self.settle(&TokenUsage::default()).await;
    }

    /// The call ended without its usage and may have been billed (see the module's comment).
    pub async fn ambiguous(mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        if self.streamed_bytes.is_some() {
            self.budgets.settle(reservation, &self.estimate()).await;
        }
        // A whole answer: the reservation stays whole.
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        if self.streamed_bytes.is_none() {
            return; // a whole answer keeps its whole reservation
        }
        let (budgets, estimate) = (self.budgets.clone(), self.estimate());
        // A closed tracker still runs what it is given, and shutdown waits for it.
        self.tasks
            .spawn(async move { budgets.settle(reservation, &estimate).await });
    }
}
