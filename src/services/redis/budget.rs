//! Budget counters on Redis: a reservation is one Lua script (check every cap, then add every
//! charge, or nothing), so replicas together cannot overshoot a cap; settling is another.
//! Counters are `budget:{key}` under `STATE_PREFIX`, and expire two days after their last
//! change (daily keys carry their date; a session's cap lasts as long as its key).
//!
//! While Redis is down: `STATE_UNAVAILABLE=local` reserves in this replica's own counters
//! (each replica then enforces the caps alone), `refuse` refuses the chat. A reservation made in
//! Redis and settled while it is down stays at its estimate there until the key expires: an
//! overcount, never an undercount.

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};
use redis::Script;

use super::Redis;
use crate::config::WhenStateUnavailable;
use crate::services::guardrails::{BudgetRefusal, BudgetStore, Charge, MemoryBudgetStore};

/// KEYS: the counters. ARGV: TTL, tolerance, then (amount, cap) per key. Returns 0, or the
/// 1-based index of the first charge that does not fit (then nothing changed).
const RESERVE: &str = r"
local tolerance = tonumber(ARGV[2])
for i = 1, #KEYS do
  local spent = tonumber(redis.call('GET', KEYS[i]) or '0')
  if spent + tonumber(ARGV[2 * i + 1]) > tonumber(ARGV[2 * i + 2]) + tolerance then return i end
end
for i = 1, #KEYS do
  redis.call('INCRBYFLOAT', KEYS[i], ARGV[2 * i + 1])
  redis.call('EXPIRE', KEYS[i], ARGV[1])
end
return 0
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
}

impl RedisBudgetStore {
    pub fn new(state: Arc<Redis>, local: MemoryBudgetStore) -> Self {
        Self {
            state,
            local,
            reserve: Script::new(RESERVE),
            adjust: Script::new(ADJUST),
        }
    }

    fn key(&self, key: &str) -> String {
        self.state.key(&format!("budget:{key}"))
    }
}

impl BudgetStore for RedisBudgetStore {
    fn reserve<'a>(&'a self, charges: &'a [Charge]) -> BoxFuture<'a, Result<(), BudgetRefusal>> {
        async move {
            let mut invocation = self.reserve.prepare_invoke();
            invocation.arg(TTL_SECS).arg(f64::EPSILON.to_string());
            for c in charges {
                invocation
                    .key(self.key(&c.key))
                    .arg(c.amount.to_string())
                    .arg(c.cap.to_string());
            }
            let shared = self
                .state
                .call("budget reserve", |mut conn| async move {
                    invocation.invoke_async::<usize>(&mut conn).await
                })
                .await;
            match shared {
                Ok(0) => Ok(()),
                Ok(i) => Err(BudgetRefusal::Over(i - 1)),
                Err(_) => match self.state.when_unavailable {
                    WhenStateUnavailable::Local => self.local.reserve(charges).await,
                    WhenStateUnavailable::Refuse => Err(BudgetRefusal::Unavailable),
                },
            }
        }
        .boxed()
    }

    fn adjust<'a>(&'a self, changes: &'a [(String, f64)]) -> BoxFuture<'a, ()> {
        async move {
            let mut invocation = self.adjust.prepare_invoke();
            invocation.arg(TTL_SECS);
            for (key, delta) in changes {
                invocation.key(self.key(key)).arg(delta.to_string());
            }
            let shared = self
                .state
                .call("budget adjust", |mut conn| async move {
                    invocation.invoke_async::<i64>(&mut conn).await
                })
                .await;
            if shared.is_err() {
                self.local.adjust(changes).await;
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
                Err(_) => self.local.spent(key).await,
            }
        }
        .boxed()
    }
}
