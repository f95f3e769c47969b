//! Where usage figures are kept. One trait, so that a shared store (Redis, for several replicas)
//! can replace the in-process one without the statistics service knowing which runs.
//!
//! Everything kept is bounded, because clients choose both model names and session ids:
//! per-session ledgers by count (oldest dropped first), and models by `MAX_MODELS` (2026-11
//! amendment): the first 256 distinct models get a row of their own, every later one (and any
//! name longer than a real model's) is summed under `"other"`. Each chat's cost is computed
//! before it is recorded, so the sums (and `"other"`'s cost) stay exact however rows are merged.

use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, ready};
use indexmap::IndexMap;

use crate::domain::TokenUsage;
use crate::domain::pricing::Cost;

/// Models with a row of their own in `by_model`; later ones go under `OTHER`.
pub const MAX_MODELS: usize = 256;
/// Longer names (no real model's) are summed under `OTHER` too, so the answer stays small:
/// at most 256 × 128 bytes of names, in `by_model` and `unpriced_models` each.
pub const MAX_MODEL_NAME_BYTES: usize = 128;
/// The `by_model` row of the models past `MAX_MODELS`.
pub const OTHER: &str = "other";

/// What a usage figure is: a chat as OpenAI reported it (the contract's totals), a connection
/// test, or a cut-short stream's estimate (kept apart, 2026-11 amendment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageKind {
    Chat,
    Test,
    Estimated,
}

pub trait UsageStore: Send + Sync {
    /// Counts one call, with its cost already computed.
    fn record<'a>(
        &'a self,
        kind: UsageKind,
        session_id: Option<&'a str>,
        model: &'a str,
        usage: &'a TokenUsage,
        cost: &'a Cost,
    ) -> BoxFuture<'a, ()>;
    /// The rows of the tests' or the estimates' ledger (the whole service's).
    fn side_figures(&self, kind: UsageKind) -> BoxFuture<'_, Figures>;
    /// The rows (`other` last) and latest model of everything, or of one session.
    fn figures<'a>(&'a self, session_id: Option<&'a str>) -> BoxFuture<'a, Figures>;
}

/// One ledger handed on by `MemoryUsageStore::take`: its kind, its session (if it is one
/// session's), its rows.
pub type TakenLedger = (UsageKind, Option<String>, Vec<(String, Tally)>);

/// What a ledger holds, for the report.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub rows: Vec<(String, Tally)>,
    pub latest_model: Option<String>,
}

impl Figures {
    /// Adds `tally` to `model`'s row, or appends a row for it.
    pub fn add_row(&mut self, model: &str, tally: &Tally) {
        match self.rows.iter_mut().find(|(m, _)| m == model) {
            Some((_, t)) => t.merge(tally),
            None => self.rows.push((model.to_string(), *tally)),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    pub cached: u64,
    pub requests: u64,
    pub prompt_cost: f64,
    pub completion_cost: f64,
    /// Some of these tokens were priced at the fallback rate.
    pub unpriced: bool,
}

impl Tally {
    fn add(&mut self, usage: &TokenUsage, cost: &Cost) {
        self.prompt += usage.prompt_tokens;
        self.completion += usage.completion_tokens;
        self.total += usage.total_tokens;
        self.cached += usage.cached_tokens;
        self.requests += 1;
        self.prompt_cost += cost.prompt;
        self.completion_cost += cost.completion;
        self.unpriced |= !cost.priced;
    }

    pub fn merge(&mut self, other: &Tally) {
        self.prompt += other.prompt;
        self.completion += other.completion;
        self.total += other.total;
        self.cached += other.cached;
        self.requests += other.requests;
        self.prompt_cost += other.prompt_cost;
        self.completion_cost += other.completion_cost;
        self.unpriced |= other.unpriced;
    }
}

/// Figures for everything or for one session. Model names are shared with the global ledger
/// (`Arc<str>`), so a session's rows cost no copies of the names.
#[derive(Debug, Default)]
struct Ledger {
    by_model: IndexMap<Arc<str>, Tally>,
    other: Tally,
    latest_model: Option<Arc<str>>,
}

impl Ledger {
    fn add(&mut self, slot: Option<&Arc<str>>, model: &Arc<str>, usage: &TokenUsage, cost: &Cost) {
        match slot {
            Some(name) => match self.by_model.get_mut(name) {
                Some(tally) => tally.add(usage, cost),
                None => {
                    let mut tally = Tally::default();
                    tally.add(usage, cost);
                    self.by_model.insert(name.clone(), tally);
                }
            },
            None => self.other.add(usage, cost),
        }
        if self.latest_model.as_ref() != Some(model) {
            self.latest_model = Some(model.clone());
        }
    }

    /// The model's own row if it has one or there is room for it (`None`: `other`), and its
    /// name, shared with the existing row (or the latest model) when there is one.
    fn slot_for(&self, model: &str) -> (Option<Arc<str>>, Arc<str>) {
        let slot = match self.by_model.get_key_value(model) {
            Some((name, _)) => Some(name.clone()),
            None if self.by_model.len() < MAX_MODELS && model.len() <= MAX_MODEL_NAME_BYTES => {
                Some(Arc::from(model))
            }
            None => None,
        };
        let name = slot.clone().unwrap_or_else(|| match &self.latest_model {
            Some(latest) if &**latest == model => latest.clone(),
            _ => Arc::from(model),
        });
        (slot, name)
    }

    /// The rows, with `other` last; a model that is itself named "other" shares its row.
    fn figures(&self) -> Figures {
        let mut rows: Vec<(String, Tally)> = self
            .by_model
            .iter()
            .map(|(m, t)| (m.to_string(), *t))
            .collect();
        if self.other.requests > 0 {
            match rows.iter_mut().find(|(m, _)| m == OTHER) {
                Some((_, tally)) => tally.merge(&self.other),
                None => rows.push((OTHER.to_string(), self.other)),
            }
        }
        Figures {
            rows,
            latest_model: self.latest_model.as_deref().map(str::to_string),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    all: Ledger,
    sessions: IndexMap<String, Ledger>,
    tests: Ledger,
    estimated: Ledger,
}

/// The in-process store. One `std::sync::Mutex` guards a few counters; it is held for a handful
/// of additions and never across an `.await`, so it costs nanoseconds even with many chats.
pub struct MemoryUsageStore {
    state: Mutex<State>,
    max_sessions: usize,
}

impl MemoryUsageStore {
    pub fn new(max_sessions: usize) -> Self {
        Self {
            state: Mutex::default(),
            max_sessions,
        }
    }

    fn record_now(
        &self,
        kind: UsageKind,
        session_id: Option<&str>,
        model: &str,
        usage: &TokenUsage,
        cost: &Cost,
    ) {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *guard;
        if kind != UsageKind::Chat {
            let ledger = if kind == UsageKind::Test {
                &mut state.tests
            } else {
                &mut state.estimated
            };
            let (slot, name) = ledger.slot_for(model);
            ledger.add(slot.as_ref(), &name, usage, cost);
            return;
        }
        let (slot, name) = state.all.slot_for(model);
        state.all.add(slot.as_ref(), &name, usage, cost);
        if let Some(id) = session_id {
            // Look up before inserting: `entry` would allocate the key on every chat.
            if let Some(ledger) = state.sessions.get_mut(id) {
                ledger.add(slot.as_ref(), &name, usage, cost);
            } else {
                if state.sessions.len() >= self.max_sessions {
                    state.sessions.shift_remove_index(0);
                }
                let mut ledger = Ledger::default();
                ledger.add(slot.as_ref(), &name, usage, cost);
                state.sessions.insert(id.to_string(), ledger);
            }
        }
    }

    /// Whether nothing has been recorded (since the last `take`).
    pub fn is_empty(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.all.by_model.is_empty()
            && state.all.other.requests == 0
            && state.tests.by_model.is_empty()
            && state.tests.other.requests == 0
            && state.estimated.by_model.is_empty()
            && state.estimated.other.requests == 0
            && state.sessions.is_empty()
    }

    /// Everything recorded so far, and empties the store (a buffer handing its figures on):
    /// `(kind, None, rows)` per ledger, and `(Chat, Some(session), rows)` per session, whose rows
    /// are also in the chat totals.
    pub fn take(&self) -> Vec<TakenLedger> {
        let state = std::mem::take(&mut *self.state.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = Vec::new();
        for (kind, ledger) in [
            (UsageKind::Chat, &state.all),
            (UsageKind::Test, &state.tests),
            (UsageKind::Estimated, &state.estimated),
        ] {
            let rows = ledger.figures().rows;
            if !rows.is_empty() {
                out.push((kind, None, rows));
            }
        }
        for (id, ledger) in &state.sessions {
            out.push((UsageKind::Chat, Some(id.clone()), ledger.figures().rows));
        }
        out
    }

    fn figures_now(&self, session_id: Option<&str>) -> Figures {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match session_id {
            Some(id) => state
                .sessions
                .get(id)
                .map(Ledger::figures)
                .unwrap_or_default(),
            None => state.all.figures(),
        }
    }
}

impl UsageStore for MemoryUsageStore {
    fn record<'a>(
        &'a self,
        kind: UsageKind,
        session_id: Option<&'a str>,
        model: &'a str,
        usage: &'a TokenUsage,
        cost: &'a Cost,
    ) -> BoxFuture<'a, ()> {
        self.record_now(kind, session_id, model, usage, cost);
        ready(()).boxed()
    }

    fn side_figures(&self, kind: UsageKind) -> BoxFuture<'_, Figures> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let figures = match kind {
            UsageKind::Test => state.tests.figures(),
            UsageKind::Estimated => state.estimated.figures(),
            UsageKind::Chat => state.all.figures(),
        };
        ready(figures).boxed()
    }

    fn figures<'a>(&'a self, session_id: Option<&'a str>) -> BoxFuture<'a, Figures> {
        ready(self.figures_now(session_id)).boxed()
    }
}
