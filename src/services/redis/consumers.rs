//! Today's consumers on Redis, exact across replicas: per day a sorted set of tokens (so the top
//! is one `ZREVRANGE`) and two hashes (requests, cost), under `STATE_PREFIX`, expiring two days
//! after their last change. Bounded: past `QUOTA_MAX_TRACKED` members a day, the smallest go
//! (the top stays exact).
//!
//! A chat never waits on Redis for this: its figures go into a local buffer, handed over in one
//! script call per batch (`Batcher`: at most 10 ms after the first chat of the batch), as usage
//! figures are. A batch whose call failed (perhaps after Redis ran it) is retried with the same
//! `op`, which Redis remembers having applied, so nothing counts twice. While Redis is down the
//! buffer holds this replica's figures (bounded like the in-process store) and reads fall back
//! to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt};
use redis::Script;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Batched, Batcher, Redis, spawn_flusher};
use crate::services::consumers::{ConsumerStore, ConsumerTally, MemoryConsumerStore};

/// KEYS: the `op` marker, tokens (sorted set), requests, cost (hashes). ARGV: TTL, most members
/// kept, marker TTL, then (member, tokens, requests, cost) per consumer. Applied once per op.
const RECORD: &str = r"
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) == false then return 0 end
for i = 4, #ARGV, 4 do
  local member = ARGV[i]
  redis.call('ZINCRBY', KEYS[2], ARGV[i + 1], member)
  redis.call('HINCRBY', KEYS[3], member, ARGV[i + 2])
  redis.call('HINCRBYFLOAT', KEYS[4], member, ARGV[i + 3])
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
if over > 0 then
  local gone = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #gone, 2 do
    redis.call('HDEL', KEYS[3], gone[i])
    redis.call('HDEL', KEYS[4], gone[i])
  end
end
for i = 2, 4 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
return 1
";

const TTL_SECS: u64 = 2 * 24 * 3600;
/// Consumers sent in one script call at most.
const ROWS_PER_CALL: usize = 256;
/// How long Redis remembers an applied batch (a retry comes within seconds of it answering).
const OP_MARKER_TTL_SECS: u64 = 900;

/// Figures on their way to Redis, named so a retry is recognised.
struct Batch {
    op: String,
    day: String,
    rows: Vec<(String, ConsumerTally)>,
}

pub struct RedisConsumerStore {
    state: Arc<Redis>,
    /// Not handed over yet; read while Redis is down.
    pending: MemoryConsumerStore,
    /// Batches whose call failed: retried first, with their op.
    unsure: Mutex<Vec<Batch>>,
    record: Script,
    max: usize,
    nonce: u64,
    next_op: AtomicU64,
    batcher: Batcher,
}

impl RedisConsumerStore {
    /// The flusher runs on `background` and hands over what is left when `stop` fires.
    pub fn new(
        state: Arc<Redis>,
        max: usize,
        background: &TaskTracker,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let store = Arc::new(Self {
            state,
            pending: MemoryConsumerStore::new(max),
            unsure: Mutex::default(),
            record: Script::new(RECORD),
            max,
            nonce: {
                use std::hash::BuildHasher;
                std::collections::hash_map::RandomState::new().hash_one(std::process::id())
            },
            next_op: AtomicU64::new(0),
            batcher: Batcher::default(),
        });
        spawn_flusher(store.clone(), background, stop);
        store
    }

    fn keys(&self, day: &str) -> [String; 3] {
        ["tokens", "requests", "cost"]
            .map(|what| self.state.key(&format!("consumers:{day}:{what}")))
    }

    async fn send(&self, batch: &Batch) -> bool {
        let mut invocation = self.record.prepare_invoke();
        invocation.key(self.state.key(&format!("consumers:applied:{}", batch.op)));
        for key in self.keys(&batch.day) {
            invocation.key(key);
        }
        invocation
            .arg(TTL_SECS)
            .arg(self.max)
            .arg(OP_MARKER_TTL_SECS);
        for (member, tally) in &batch.rows {
            invocation
                .arg(member)
                .arg(tally.tokens)
                .arg(tally.requests)
                .arg(tally.cost_usd.to_string());
        }
        self.state
            .call("consumers record", |mut conn| async move {
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await
            .is_ok()
    }

    /// Hands the buffer to Redis; a batch whose call failed waits, with its op, for the next.
    async fn flush(&self) {
        let retry = std::mem::take(&mut *self.unsure.lock().unwrap_or_else(|e| e.into_inner()));
        let (day, rows) = self.pending.take();
        let mut fresh = Vec::new();
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            fresh.push(Batch {
                op: format!(
                    "{:x}-{:x}",
                    self.nonce,
                    self.next_op.fetch_add(1, Ordering::Relaxed)
                ),
                day: day.clone(),
                rows: rows.by_ref().take(ROWS_PER_CALL).collect(),
            });
        }
        let mut batches = retry.into_iter().chain(fresh);
        while let Some(batch) = batches.next() {
            if self.send(&batch).await {
                continue;
            }
            let mut unsure = self.unsure.lock().unwrap_or_else(|e| e.into_inner());
            unsure.push(batch);
            unsure.extend(batches);
            // Bounded like the buffer: the oldest batches go first.
            let over = unsure
                .len()
                .saturating_sub(self.max.div_ceil(ROWS_PER_CALL));
            unsure.drain(..over);
            return;
        }
    }
}

impl Batched for RedisConsumerStore {
    fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    fn redis(&self) -> &Arc<Redis> {
        &self.state
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        RedisConsumerStore::flush(self).boxed()
    }
}

impl ConsumerStore for Arc<RedisConsumerStore> {
    fn record<'a>(&'a self, day: &'a str, key: &'a str, tally: ConsumerTally) -> BoxFuture<'a, ()> {
        self.pending.record_now(day, key, tally);
        self.batcher.poke();
        futures_util::future::ready(()).boxed()
    }

    fn top<'a>(&'a self, day: &'a str, n: usize) -> BoxFuture<'a, Vec<(String, ConsumerTally)>> {
        async move {
            let [tokens, requests, cost] = self.keys(day);
            let stop = n.saturating_sub(1) as isize;
            let top = self
                .state
                .call("consumers top", |mut conn| async move {
                    redis::cmd("ZREVRANGE")
                        .arg(tokens)
                        .arg(0)
                        .arg(stop)
                        .arg("WITHSCORES")
                        .query_async::<Vec<(String, f64)>>(&mut conn)
                        .await
                })
                .await;
            let Ok(top) = top else {
                return self.pending.top_now(day, n);
            };
            if top.is_empty() {
                return Vec::new();
            }
            let members: Vec<&str> = top.iter().map(|(m, _)| m.as_str()).collect();
            let details = self
                .state
                .call("consumers details", |mut conn| async move {
                    redis::pipe()
                        .cmd("HMGET")
                        .arg(requests)
                        .arg(&members)
                        .cmd("HMGET")
                        .arg(cost)
                        .arg(&members)
                        .query_async::<(Vec<Option<u64>>, Vec<Option<f64>>)>(&mut conn)
                        .await
                })
                .await
                .unwrap_or_default();
            top.iter()
                .enumerate()
                .map(|(i, (member, tokens))| {
                    let tally = ConsumerTally {
                        tokens: tokens.round() as u64,
                        requests: details.0.get(i).copied().flatten().unwrap_or(0),
                        cost_usd: details.1.get(i).copied().flatten().unwrap_or(0.0),
                    };
                    (member.clone(), tally)
                })
                .collect()
        }
        .boxed()
    }

    fn one<'a>(&'a self, day: &'a str, key: &'a str) -> BoxFuture<'a, ConsumerTally> {
        async move {
            let [tokens, requests, cost] = self.keys(day);
            let member = key.to_string();
            let shared = self
                .state
                .call("consumers one", |mut conn| async move {
                    redis::pipe()
                        .cmd("ZSCORE")
                        .arg(tokens)
                        .arg(&member)
                        .cmd("HGET")
                        .arg(requests)
                        .arg(&member)
                        .cmd("HGET")
                        .arg(cost)
                        .arg(&member)
                        .query_async::<(Option<f64>, Option<u64>, Option<f64>)>(&mut conn)
                        .await
                })
                .await;
            match shared {
                Ok((tokens, requests, cost)) => ConsumerTally {
                    tokens: tokens.unwrap_or(0.0).round() as u64,
                    requests: requests.unwrap_or(0),
                    cost_usd: cost.unwrap_or(0.0),
                },
                Err(_) => self.pending.one_now(day, key),
            }
        }
        .boxed()
    }
}
