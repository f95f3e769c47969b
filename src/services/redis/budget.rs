//! Budget counters on Redis: a reservation is one Lua script (find the answer tokens every cap
//! has room for, then add every charge, or nothing), so replicas together cannot overshoot a cap;
//! settling is another. Counters are `budget:{key}` under `STATE_PREFIX`, and expire two days
//! after their last change (daily keys carry their date; a session's cap lasts as long as its
//! key).
//!
//! While Redis is down: `STATE_UNAVAILABLE=local` reserves in this replica's own counters
//! (each replica then enforces the caps alone), `refuse` refuses the chat. A reservation settles
//! where it was taken (`Place`): one taken locally never corrects Redis (which never counted
//! it), and one taken on Redis whose settlement finds Redis down keeps its correction here and
//! replays it with the next settlement that reaches Redis. So a flap neither undercounts nor
//! counts twice; until the replay, Redis holds the whole reservation (an overcount).

use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt};
use redis::Script;

use super::Redis;
use crate::config::WhenStateUnavailable;
use crate::services::guardrails::budget::{Granted, Place};
use crate::services::guardrails::{BudgetRefusal, BudgetStore, Charge, MemoryBudgetStore};

/// KEYS: the counters. ARGV: TTL, tolerance, least and most answer tokens, then (fixed,
/// per answer token, cap) per key. Returns {0, n}: n answer tokens granted and added; or {i, 0}:
/// charge i (1-based) cannot take even the least, and nothing changed. (`budget::fit` in Lua.)
const RESERVE: &str = r"
local tolerance = tonumber(ARGV[2])
local least = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
for i = 1, #KEYS do
  local fixed = tonumber(ARGV[3 * i + 2])
  local per = tonumber(ARGV[3 * i + 3])
  local room = tonumber(ARGV[3 * i + 4]) - tonumber(redis.call('GET', KEYS[i]) or '0') - fixed
  if room + tolerance < per * least then return {i, 0} end
  if per > 0 and room + tolerance < per * n then
    n = math.max(least, math.floor((room + tolerance) / per))
  end
end
for i = 1, #KEYS do
  local amount = tonumber(ARGV[3 * i + 2]) + tonumber(ARGV[3 * i + 3]) * n
  redis.call('INCRBYFLOAT', KEYS[i], string.format('%.17g', amount))
  redis.call('EXPIRE', KEYS[i], ARGV[1])
end
return {0, n}
";

/// KEYS: the counters. ARGV: TTL, then the change per key (never below zero).
const ADJUST: &str = r"
for i = 1, #KEYS do
  local v = tonumber(redis.call('INCRBYFLOAT', KEYS[i], ARGV[i + 1]))
  if v < 0 then redis.call('SET', KEYS[i], '0') end
  redis.call('EXPIRE', KEYS[i], ARGV[1])
end
return 1
";

const TTL_SECS: u64 = 2 * 24 * 3600;

pub struct RedisBudgetStore {
    state: Arc<Redis>,
    local: MemoryBudgetStore,
    reserve: Script,
    adjust: Script,
    /// Settlements of Redis reservations made while Redis was down, replayed with the next
    /// settlement that reaches it.
    pending: Mutex<Vec<(Arc<str>, f64)>>,
}

/// Corrections kept while Redis is down; past this the oldest are dropped, and each dropped one
/// leaves its reservation whole on Redis (an overcount, never an undercount).
const MAX_PENDING: usize = 16 * 1024;

impl RedisBudgetStore {
    pub fn new(state: Arc<Redis>, local: MemoryBudgetStore) -> Self {
        Self {
            state,
            local,
            reserve: Script::new(RESERVE),
            adjust: Script::new(ADJUST),
            pending: Mutex::default(),
        }
    }

    fn key(&self, key: &str) -> String {
        self.state.key(&format!("budget:{key}"))
    }
}

impl BudgetStore for RedisBudgetStore {
    fn reserve<'a>(
        &'a self,
        charges: &'a [Charge],
        min_output: u64,
        max_output: u64,
    ) -> BoxFuture<'a, Result<Granted, BudgetRefusal>> {
        async move {
            let mut invocation = self.reserve.prepare_invoke();
            invocation
                .arg(TTL_SECS)
                .arg("1e-9")
                .arg(min_output)
                .arg(max_output);
            for c in charges {
                invocation
                    .key(self.key(&c.key))
                    .arg(c.fixed.to_string())
                    .arg(c.per_output.to_string())
                    .arg(c.cap.to_string());
            }
            let shared = self
                .state
                .call("budget reserve", |mut conn| async move {
                    invocation.invoke_async::<(usize, u64)>(&mut conn).await
                })
                .await;
            match shared {
                Ok((0, output)) => Ok(Granted {
                    output,
                    place: Place::Shared,
                }),
                Ok((i, _)) => Err(BudgetRefusal::Over(i - 1)),
                Err(_) => match self.state.when_unavailable {
                    WhenStateUnavailable::Local => {
                        self.local.reserve_now(charges, min_output, max_output)
                    }
                    WhenStateUnavailable::Refuse => Err(BudgetRefusal::Unavailable),
                },
            }
        }
        .boxed()
    }

    fn adjust<'a>(&'a self, changes: &'a [(Arc<str>, f64)], place: Place) -> BoxFuture<'a, ()> {
        async move {
            if place == Place::Local {
                self.local.adjust_now(changes);
                return;
            }
            let mut all =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            all.extend_from_slice(changes);
            let mut invocation = self.adjust.prepare_invoke();
            invocation.arg(TTL_SECS);
            for (key, delta) in &all {
                invocation.key(self.key(key)).arg(delta.to_string());
            }
            let shared = self
                .state
                .call("budget adjust", |mut conn| async move {
                    invocation.invoke_async::<i64>(&mut conn).await
                })
                .await;
            if shared.is_err() {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                all.append(&mut pending);
                let over = all.len().saturating_sub(MAX_PENDING);
                all.drain(..over);
                *pending = all;
            }
        }
        .boxed()
    }

    fn spent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, f64> {
        async move {
            let redis_key = self.key(key);
            let shared = self.state.get::<f64>("budget spent", redis_key).await;
            match shared {
                Ok(spent) => spent.unwrap_or(0.0),
                Err(_) => self.local.spent_now(key),
            }
        }
        .boxed()
    }

    fn spent_all<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Vec<f64>> {
        async move {
            if keys.is_empty() {
                return Vec::new();
            }
            let redis_keys: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
            let shared = self
                .state
                .call("budget spent", |mut conn| async move {
                    redis::cmd("MGET")
                        .arg(redis_keys)
                        .query_async::<Vec<Option<f64>>>(&mut conn)
                        .await
                })
                .await;
            match shared {
                Ok(spent) => spent.into_iter().map(|s| s.unwrap_or(0.0)).collect(),
                Err(_) => self.local.spent_all_now(keys),
            }
        }
        .boxed()
    }
}
