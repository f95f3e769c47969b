//! Today's consumers on Redis, exact across replicas: per day a sorted set of tokens (so the top
//! is one `ZREVRANGE`) and two hashes (requests, cost), under `STATE_PREFIX`, expiring two days
//! after their last change. Bounded: past `QUOTA_MAX_TRACKED` members a day, the smallest go
//! (the top stays exact). While Redis is down, calls are counted in this replica's own store.

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};
use redis::Script;

use super::Redis;
use crate::services::consumers::{ConsumerStore, ConsumerTally, MemoryConsumerStore};

/// KEYS: tokens (sorted set), requests, cost (hashes). ARGV: member, tokens, cost, TTL, most
/// members kept.
const RECORD: &str = r"
redis.call('ZINCRBY', KEYS[1], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HINCRBYFLOAT', KEYS[3], ARGV[1], ARGV[3])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5])
if over > 0 then
  local gone = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #gone, 2 do
    redis.call('HDEL', KEYS[2], gone[i])
    redis.call('HDEL', KEYS[3], gone[i])
  end
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
";

const TTL_SECS: u64 = 2 * 24 * 3600;

pub struct RedisConsumerStore {
    state: Arc<Redis>,
    local: MemoryConsumerStore,
    record: Script,
    max: usize,
}

impl RedisConsumerStore {
    pub fn new(state: Arc<Redis>, local: MemoryConsumerStore, max: usize) -> Self {
        Self {
            state,
            local,
            record: Script::new(RECORD),
            max,
        }
    }

    fn keys(&self, day: &str) -> [String; 3] {
        ["tokens", "requests", "cost"]
            .map(|what| self.state.key(&format!("consumers:{day}:{what}")))
    }
}

impl ConsumerStore for RedisConsumerStore {
    fn record<'a>(&'a self, day: &'a str, key: &'a str, tally: ConsumerTally) -> BoxFuture<'a, ()> {
        async move {
            let mut invocation = self.record.prepare_invoke();
            for k in self.keys(day) {
                invocation.key(k);
            }
            invocation
                .arg(key)
                .arg(tally.tokens)
                .arg(tally.cost_usd.to_string())
                .arg(TTL_SECS)
                .arg(self.max);
            let shared = self
                .state
                .call("consumers record", |mut conn| async move {
                    invocation.invoke_async::<i64>(&mut conn).await
                })
                .await;
            if shared.is_err() {
                self.local.record_now(day, key, tally);
            }
        }
        .boxed()
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
                return self.local.top_now(day, n);
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
                Err(_) => self.local.one_now(day, key),
            }
        }
        .boxed()
    }
}
