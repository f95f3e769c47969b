//! What the guardrails' one door hands back: a call that may reach OpenAI, with its budget
//! reservation. Whoever ends the call settles it (`settle` with the real usage, `release` when
//! the upstream provably took nothing). Dropped unsettled (a client went away, the handler was
//! cancelled), it settles an estimate itself: the prompt plus the text streamed so far, on a task
//! of the application's tracker, which shutdown waits for. Nothing is detached.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use super::budget::{Budgets, CHARS_PER_TOKEN, Reservation};
use crate::domain::TokenUsage;

pub struct Admission {
    budgets: Arc<Budgets>,
    /// `None` once settled, or when no budget is set (nothing to settle).
    reservation: Option<Reservation>,
    tasks: TaskTracker,
    prompt_tokens: u64,
    streamed_chars: u64,
}

impl Admission {
    pub(super) fn new(
        budgets: Arc<Budgets>,
        reservation: Reservation,
        tasks: TaskTracker,
        input_chars: usize,
    ) -> Self {
        Self {
            budgets,
            reservation: Some(reservation).filter(|r| !r.is_empty()),
            tasks,
            prompt_tokens: (input_chars as u64).div_ceil(CHARS_PER_TOKEN),
            streamed_chars: 0,
        }
    }

    /// The answer streamed so far has `chars` characters (bytes of UTF-8): what an estimate
    /// counts if the call ends before the upstream reports its usage.
    pub fn streamed(&mut self, chars: usize) {
        self.streamed_chars = chars as u64;
    }

    /// The prompt, plus the streamed text at four characters a token.
    pub fn estimate(&self) -> TokenUsage {
        let completion = self.streamed_chars.div_ceil(CHARS_PER_TOKEN);
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
}

impl Drop for Admission {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let (budgets, estimate) = (self.budgets.clone(), self.estimate());
        // A closed tracker still runs what it is given, and shutdown waits for it.
        self.tasks
            .spawn(async move { budgets.settle(reservation, &estimate).await });
    }
}
