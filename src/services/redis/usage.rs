//! Usage statistics on Redis: totals, by model and by session, the same on every replica and
//! kept across replica restarts.
//!
//! Keys (under `STATE_PREFIX`): `usage:{kind}` is a hash per ledger (`chat`, `test`,
//! `estimated`), `usage:session:{id}` one per session (expiring after `SESSION_MAX_AGE_HOURS`
//! without chats), with fields `{model}|p`, `|c`, `|t`, `|k` (tokens), `|n` (calls), `|pc`, `|cc`
//! (cost) and `|u` (unpriced), and `~latest`. `usage:{kind}:models` gives each model its row
//! number: the first 256 get rows of their own, later ones are summed under `other`, as in
//! process. One Lua script records a chat in every ledger it touches, atomically.
//!
//! A chat is counted in a local buffer first (the in-process store, bounded the same way), and
//! the buffer is handed to Redis in batches: one script call per ledger and model for whatever
//! arrived within `BATCH_WINDOW`, so a burst of chats costs Redis a few calls, not one each, and
//! no chat waits on Redis to be counted. A replica's answers add its own buffer to Redis'
//! figures, so its own chats always show. While Redis is down the buffer keeps filling and is
//! handed over when it is back, so totals come out exact once it is; meanwhile the replica
//! answers from the last figures it read plus its buffer. At shutdown the buffer is handed
//! over (within the shutdown grace).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::sync::atomic::Ordering;

use futures_util::future::{BoxFuture, FutureExt};
use redis::Script;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Batched, Batcher, Redis, spawn_flusher};
use crate::domain::TokenUsage;
use crate::domain::pricing::Cost;
use crate::services::usage::{
    Figures, MAX_MODEL_NAME_BYTES, MAX_MODELS, MemoryUsageStore, OTHER, Tally, UsageKind,
    UsageStore,
};

/// KEYS[1]: the chunk's marker; then per row its models hash and its ledger. ARGV[1]: the
/// marker's TTL; then per row 12 values: model, may it have a row of its own (its name is short
/// enough), the most models with rows, prompt, completion, total, cached, calls, prompt cost,
/// completion cost, unpriced, the ledger's TTL (0: none). A chunk already applied (a retry after
/// a call that failed once Redis had run it) is skipped whole.
const RECORD: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for r = 0, (#KEYS - 1) / 2 - 1 do
  local models, k, a = KEYS[2 + 2 * r], KEYS[3 + 2 * r], 1 + 12 * r
  local model = ARGV[a + 1]
  local slot = 'other'
  if ARGV[a + 2] == '1' then
    if redis.call('HEXISTS', models, model) == 1 then
      slot = model
    else
      local rows = redis.call('HLEN', models)
      if rows < tonumber(ARGV[a + 3]) then
        redis.call('HSET', models, model, rows)
        slot = model
      end
    end
  end
  redis.call('HINCRBY', k, slot .. '|p', ARGV[a + 4])
  redis.call('HINCRBY', k, slot .. '|c', ARGV[a + 5])
  redis.call('HINCRBY', k, slot .. '|t', ARGV[a + 6])
  redis.call('HINCRBY', k, slot .. '|k', ARGV[a + 7])
  redis.call('HINCRBY', k, slot .. '|n', ARGV[a + 8])
  redis.call('HINCRBYFLOAT', k, slot .. '|pc', ARGV[a + 9])
  redis.call('HINCRBYFLOAT', k, slot .. '|cc', ARGV[a + 10])
  if ARGV[a + 11] == '1' then redis.call('HSET', k, slot .. '|u', '1') end
  redis.call('HSET', k, '~latest', model)
  if tonumber(ARGV[a + 12]) > 0 then redis.call('EXPIRE', k, ARGV[a + 12]) end
end
return 1
";

/// Ledgers whose last figures are kept for answering while Redis is down, at most.
const MAX_REMEMBERED: usize = 1024;

pub struct RedisUsageStore {
    state: Arc<Redis>,
    /// Chats counted while Redis was down, merged into it when it is back.
    pending: Arc<MemoryUsageStore>,
    /// The last figures read per ledger key (answers while Redis is down).
    last_read: Mutex<HashMap<String, Figures>>,
    session_ttl_secs: u64,
    record: Script,
    /// Chunks not handed over yet (their call failed, perhaps after Redis ran it), with their op.
    unsure: Mutex<Vec<Chunk>>,
    /// This process's ops: `{nonce}-{counter}`.
    nonce: u64,
    next_op: std::sync::atomic::AtomicU64,
    batcher: Batcher,
}

/// Rows sent in one script call at most.
const ROWS_PER_CALL: usize = 64;
/// How long Redis remembers an applied chunk: a retry comes within seconds of Redis answering
/// again, so this only has to outlast that (and keeps the markers few).
const OP_MARKER_TTL_SECS: u64 = 900;

/// Rows handed over in one call, named so a retry is recognised.
struct Chunk {
    op: String,
    rows: Vec<Row>,
}

/// One ledger's row for one model, on its way to Redis.
struct Row {
    kind: UsageKind,
    session: Option<String>,
    model: String,
    tally: Tally,
}

fn kind_name(kind: UsageKind) -> &'static str {
    match kind {
        UsageKind::Chat => "chat",
        UsageKind::Test => "test",
        UsageKind::Estimated => "estimated",
    }
}

impl RedisUsageStore {
    /// `max_sessions` bounds the sessions the buffer keeps apart. The flusher runs on
    /// `background` and hands over what is left when `stop` fires.
    pub fn new(
        state: Arc<Redis>,
        max_sessions: usize,
        session_max_age: chrono::Duration,
        background: &TaskTracker,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let store = Arc::new(Self {
            state,
            pending: Arc::new(MemoryUsageStore::new(max_sessions)),
            last_read: Mutex::default(),
            session_ttl_secs: session_max_age.num_seconds().max(1) as u64,
            record: Script::new(RECORD),
            unsure: Mutex::default(),
            nonce: {
                use std::hash::BuildHasher;
                std::collections::hash_map::RandomState::new().hash_one(std::process::id())
            },
            next_op: std::sync::atomic::AtomicU64::new(0),
            batcher: Batcher::default(),
        });
        // The store lives as long as the application; the flusher ends at shutdown.
        spawn_flusher(store.clone(), background, stop);
        store
    }

    fn ledger_key(&self, kind: UsageKind, session: Option<&str>) -> String {
        match session {
            Some(id) => self.state.key(&format!("usage:session:{id}")),
            None => self.state.key(&format!("usage:{}", kind_name(kind))),
        }
    }

    fn models_key(&self, kind: UsageKind) -> String {
        self.state.key(&format!("usage:{}:models", kind_name(kind)))
    }

    /// A chunk of rows into their ledgers, once: Redis skips a chunk whose `op` it has
    /// applied, so a call that failed after Redis ran it is retried without counting twice.
    async fn add(&self, chunk: &Chunk) -> bool {
        let mut invocation = self.record.prepare_invoke();
        invocation
            .key(self.state.key(&format!("usage:applied:{}", chunk.op)))
            .arg(OP_MARKER_TTL_SECS);
        for row in &chunk.rows {
            let t = &row.tally;
            invocation
                .key(self.models_key(row.kind))
                .key(self.ledger_key(row.kind, row.session.as_deref()))
                .arg(&row.model)
                .arg(u8::from(row.model.len() <= MAX_MODEL_NAME_BYTES))
                .arg(MAX_MODELS)
                .arg(t.prompt)
                .arg(t.completion)
                .arg(t.total)
                .arg(t.cached)
                .arg(t.requests)
                .arg(t.prompt_cost.to_string())
                .arg(t.completion_cost.to_string())
                .arg(u8::from(t.unpriced))
                .arg(if row.session.is_some() {
                    self.session_ttl_secs
                } else {
                    0
                });
        }
        self.state
            .call("usage record", |mut conn| async move {
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await
            .is_ok()
    }

    /// Hands the buffer to Redis in chunks. A chunk whose call failed is kept with its `op` and
    /// retried first next time; the chunks not tried go back into the buffer.
    async fn flush_pending(&self) {
        let retry = std::mem::take(&mut *self.unsure.lock().unwrap_or_else(|e| e.into_inner()));
        if retry.is_empty() && self.pending.is_empty() {
            return;
        }
        let rows: Vec<Row> = self
            .pending
            .take()
            .into_iter()
            .flat_map(|(kind, session, rows)| {
                rows.into_iter().map(move |(model, tally)| Row {
                    kind,
                    session: session.clone(),
                    model,
                    tally,
                })
            })
            .collect();
        let mut fresh = Vec::new();
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            fresh.push(Chunk {
                op: format!(
                    "{:x}-{:x}",
                    self.nonce,
                    self.next_op.fetch_add(1, Ordering::Relaxed)
                ),
                rows: rows.by_ref().take(ROWS_PER_CALL).collect(),
            });
        }
        let mut chunks = retry.into_iter().chain(fresh);
        while let Some(chunk) = chunks.next() {
            if self.add(&chunk).await {
                continue;
            }
            // Redis may or may not have applied this one: retried with the same op. The rest
            // were not tried; they wait too (Redis is down now).
            let mut unsure = self.unsure.lock().unwrap_or_else(|e| e.into_inner());
            unsure.push(chunk);
            unsure.extend(chunks);
            let kept: u64 = unsure
                .iter()
                .flat_map(|c| &c.rows)
                .filter(|r| r.session.is_none())
                .map(|r| r.tally.requests)
                .sum();
            tracing::warn!(
                calls = kept,
                "usage not handed to Redis (it is down); kept in this replica until it is back"
            );
            return;
        }
    }

    fn remember(&self, key: String, figures: &Figures) {
        let mut last = self.last_read.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() >= MAX_REMEMBERED && !last.contains_key(&key) {
            last.clear();
        }
        last.insert(key, figures.clone());
    }

    /// The last figures read for `key` (just now, while Redis is up), plus what the buffer holds
    /// for the same ledger.
    async fn fallback(&self, key: &str, buffered: Figures) -> Figures {
        let mut figures = self
            .last_read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_default();
        for (model, tally) in &buffered.rows {
            figures.add_row(model, tally);
        }
        if buffered.latest_model.is_some() {
            figures.latest_model = buffered.latest_model;
        }
        figures
    }

    async fn read(&self, kind: UsageKind, session: Option<&str>) -> Figures {
        let key = self.ledger_key(kind, session);
        let models = self.models_key(kind);
        let read_key = key.clone();
        let answer = self
            .state
            .call("usage figures", |mut conn| async move {
                redis::pipe()
                    .hgetall(read_key)
                    .hgetall(models)
                    .query_async::<(Vec<(String, String)>, Vec<(String, u64)>)>(&mut conn)
                    .await
            })
            .await;
        // This replica's chats not handed to Redis yet.
        let buffered = match (kind, session) {
            (UsageKind::Chat, _) => self.pending.figures(session).await,
            _ => self.pending.side_figures(kind).await,
        };
        if let Ok((fields, order)) = answer {
            self.remember(key.clone(), &parse(fields, order));
        }
        // And what a failed call left waiting for Redis.
        let mut buffered = buffered;
        for chunk in self.unsure.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            for row in &chunk.rows {
                if row.kind == kind && row.session.as_deref() == session {
                    buffered.add_row(&row.model, &row.tally);
                }
            }
        }
        self.fallback(&key, buffered).await
    }
}

/// A ledger hash's fields → rows in the order models got their rows, `other` last.
fn parse(fields: Vec<(String, String)>, order: Vec<(String, u64)>) -> Figures {
    let mut rows: HashMap<String, Tally> = HashMap::new();
    let mut latest_model = None;
    for (field, value) in fields {
        if field == "~latest" {
            latest_model = Some(value);
            continue;
        }
        let Some((model, part)) = field.rsplit_once('|') else {
            continue;
        };
        let tally = rows.entry(model.to_string()).or_default();
        let int = || value.parse::<u64>().unwrap_or(0);
        let float = || value.parse::<f64>().unwrap_or(0.0);
        match part {
            "p" => tally.prompt = int(),
            "c" => tally.completion = int(),
            "t" => tally.total = int(),
            "k" => tally.cached = int(),
            "n" => tally.requests = int(),
            "pc" => tally.prompt_cost = float(),
            "cc" => tally.completion_cost = float(),
            "u" => tally.unpriced = value == "1",
            _ => {}
        }
    }
    let position: HashMap<String, u64> = order.into_iter().collect();
    let mut rows: Vec<(String, Tally)> = rows.into_iter().collect();
    rows.sort_by_key(|(model, _)| {
        if model == OTHER {
            u64::MAX
        } else {
            position.get(model).copied().unwrap_or(u64::MAX - 1)
        }
    });
    Figures { rows, latest_model }
}

impl Batched for RedisUsageStore {
    fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    fn redis(&self) -> &Arc<Redis> {
        &self.state
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        self.flush_pending().boxed()
    }
}

impl UsageStore for Arc<RedisUsageStore> {
    fn record<'a>(
        &'a self,
        kind: UsageKind,
        session_id: Option<&'a str>,
        model: &'a str,
        usage: &'a TokenUsage,
        cost: &'a Cost,
    ) -> BoxFuture<'a, ()> {
        async move {
            // Counted here at once; handed to Redis with the next batch.
            self.pending
                .record(kind, session_id, model, usage, cost)
                .await;
            self.batcher.poke();
        }
        .boxed()
    }

    fn side_figures(&self, kind: UsageKind) -> BoxFuture<'_, Figures> {
        async move { self.read(kind, None).await }.boxed()
    }

    fn figures<'a>(&'a self, session_id: Option<&'a str>) -> BoxFuture<'a, Figures> {
        async move { self.read(UsageKind::Chat, session_id).await }.boxed()
    }
}
