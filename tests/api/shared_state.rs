//! Several replicas of the real app sharing state on a real `redis-server` (`STATE_URL`):
//! unique session ids, sessions and the current-session fallback across replicas, exact shared
//! totals, budgets and rate limits that hold across replicas, and Redis dying mid-run.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use al_chat::clock::Clock;
use al_chat::config::{Config, RedisSettings, WhenStateUnavailable};
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, eventually_seeing, eventually_within, manual_clock, spawn_app_with,
    spawn_app_with_clock,
};
use crate::mock_openai::{MockOpenAi, Reply};
use crate::mock_papita::MockPapita;
use crate::redis_server::RedisServer;

fn shared(c: &mut Config, url: &str) {
    c.redis = Some(RedisSettings {
        url: url.into(),
        prefix: "al-chat:".into(),
        when_unavailable: WhenStateUnavailable::Local,
        timeout: Duration::from_millis(250),
    });
}

async fn replicas(
    n: usize,
    url: &str,
    setup: impl Fn(&mut Config, &MockOpenAi, &MockPapita),
) -> Vec<TestApp> {
    let mut apps = Vec::new();
    for _ in 0..n {
        apps.push(
            spawn_app_with(|c, o, p| {
                shared(c, url);
                setup(c, o, p);
            })
            .await,
        );
    }
    apps
}

/// `usage` once `ready` holds of it (replicas hand their chats to Redis within milliseconds);
/// fails with the last answer seen.
async fn usage_when(app: &TestApp, query: &str, ready: impl Fn(&Value) -> bool) -> Value {
    eventually_seeing(
        &format!("/api/openai/usage{query} to agree"),
        Duration::from_secs(5),
        || usage(app, query),
        ready,
    )
    .await
}

async fn usage(app: &TestApp, query: &str) -> Value {
    app.get(&format!("/api/openai/usage{query}"))
        .await
        .json()
        .await
        .unwrap()
}

/// The figures every replica must agree on.
fn totals(u: &Value) -> Value {
    json!([
        u["request_count"],
        u["total_prompt_tokens"],
        u["total_completion_tokens"],
        u["total_tokens"],
        u["estimated_cost_usd"],
        u["by_model"]
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_starts_over_three_replicas_get_distinct_ids() {
    let redis = RedisServer::start().await;
    let apps = replicas(3, &redis.url(), |_, _, _| {}).await;
    let starts = (0..1000).map(|i| apps[i % 3].post_json("/api/session/start", &json!({})));
    let answers = futures_util::future::join_all(starts).await;
    let mut ids = HashSet::new();
    for r in answers {
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        ids.insert(body["session_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1000, "every id distinct");
    assert!(ids.iter().all(|id| id.starts_with("session_")));
}

#[tokio::test]
async fn a_session_started_on_one_replica_stops_on_another_with_its_duration() {
    let redis = RedisServer::start().await;
    let clock = manual_clock(2026, 11, 25, 14, 0, 0, 0);
    let mut apps = Vec::new();
    for _ in 0..3 {
        let url = redis.url();
        apps.push(spawn_app_with_clock(clock.clone(), move |c, _, _| shared(c, &url)).await);
    }
    let id = apps[0].start_session_id().await;
    // The current-session fallback is shared: a chat without an id on replica B is the session's.
    assert_eq!(
        apps[1].post_chat(&json!({"message": "hi"})).await.status(),
        200
    );
    let session = usage_when(&apps[2], &format!("?session_id={id}"), |u| {
        u["request_count"] == 1
    })
    .await;
    assert_eq!(session["request_count"], 1, "{session}");
    clock.set(clock.now() + chrono::Duration::milliseconds(90_500));
    let stopped: Value = apps[1]
        .stop_session(&json!({"session_id": id}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stopped["duration_seconds"], 90.5);
    // Stopped everywhere: no replica's chat falls back to it any more.
    assert_eq!(
        apps[2].post_chat(&json!({"message": "hi"})).await.status(),
        200
    );
    assert_eq!(
        usage(&apps[0], &format!("?session_id={id}")).await["request_count"],
        1
    );
    // A stop without an id on a third replica stops the latest session, wherever it started.
    let r = apps[2].stop_session(&json!({})).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_of_300_chats_over_three_replicas_are_exact_on_each_and_survive_a_restart() {
    let redis = RedisServer::start().await;
    let mut apps = replicas(3, &redis.url(), |_, openai, _| {
        openai.set_default(Reply::text("ok", 7, 3));
    })
    .await;
    let chats = (0..300).map(|i| {
        let model = if i % 2 == 0 {
            "gpt-4o-mini"
        } else {
            "gpt-3.5-turbo"
        };
        apps[i % 3].post_chat(&json!({"message": "hi", "model": model}))
    });
    for r in futures_util::future::join_all(chats).await {
        assert_eq!(r.status(), 200);
    }
    let first = usage_when(&apps[0], "", |u| u["request_count"] == 300).await;
    assert_eq!(first["request_count"], 300);
    assert_eq!(first["total_prompt_tokens"], 300 * 7);
    assert_eq!(first["total_completion_tokens"], 300 * 3);
    assert_eq!(first["by_model"]["gpt-4o-mini"]["request_count"], 150);
    for app in &apps[1..] {
        let same = usage_when(app, "", |u| totals(u) == totals(&first)).await;
        assert_eq!(totals(&same), totals(&first));
    }
    // A replica restarts: the totals live in Redis, not in it.
    let mut gone = apps.remove(0);
    gone.shutdown().await;
    let url = redis.url();
    let again = spawn_app_with(move |c, _, _| shared(c, &url)).await;
    assert_eq!(totals(&usage(&again, "").await), totals(&first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_across_replicas() {
    let redis = RedisServer::start().await;
    let apps = replicas(3, &redis.url(), |c, openai, _| {
        // "hi" is 1 prompt token by the estimate, plus 1,000 reserved for the answer.
        c.guardrails.budget.daily_tokens = Some(10 * 1001);
        openai.set_default(Reply::slow("ok", Duration::from_millis(500)));
    })
    .await;
    let chats = (0..51).map(|i| apps[i % 3].post_chat(&json!({"message": "hi"})));
    let responses = futures_util::future::join_all(chats).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let refused = responses.iter().filter(|r| r.status() == 429).count();
    assert_eq!(
        (ok, refused),
        (10, 41),
        "ten fit the shared budget, not ten per replica"
    );
    let upstream: usize = apps.iter().map(|a| a.openai.request_count()).sum();
    assert_eq!(upstream, 10, "only ten reached OpenAI");
    let report = usage(&apps[2], "").await;
    assert!(report["budget"]["spent"]["daily_tokens"].as_u64().unwrap() <= 10 * 1001);
}

#[tokio::test]
async fn a_rate_limit_is_shared_by_the_replicas() {
    let redis = RedisServer::start().await;
    let apps = replicas(3, &redis.url(), |c, _, _| {
        c.guardrails.rate.chat = std::num::NonZeroU32::new(6);
    })
    .await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..18 {
        let r = apps[i % 3].post_chat(&json!({"message": "hi"})).await;
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
        }
        statuses.push(r.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        6,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 12);
    let wait: u64 = retry_after.expect("Retry-After on a 429").parse().unwrap();
    assert!((1..=60).contains(&wait), "until the window ends: {wait}");
}

/// Each request during the outage must answer well within the test client's timeout.
async fn timed<F: std::future::Future<Output = reqwest::Response>>(f: F) -> reqwest::Response {
    let started = Instant::now();
    let r = f.await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a request waited {:?} on a dead Redis",
        started.elapsed()
    );
    r
}

async fn ready(app: &TestApp) -> Value {
    app.get("/api/ready").await.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_fails_no_chat_hangs_no_request_and_state_resumes() {
    let mut redis = RedisServer::start().await;
    let apps = replicas(2, &redis.url(), |c, openai, _| {
        c.guardrails.rate.chat = std::num::NonZeroU32::new(10_000);
        openai.set_default(Reply::text("ok", 5, 5));
    })
    .await;
    for i in 0..10 {
        assert_eq!(
            apps[i % 2]
                .post_chat(&json!({"message": "hi"}))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        ready(&apps[0]).await["checks"]["shared_state"]["status"],
        "ok"
    );

    redis.kill();
    for i in 0..20 {
        let r = timed(apps[i % 2].post_chat(&json!({"message": "hi"}))).await;
        assert_eq!(r.status(), 200, "chats go on without Redis");
    }
    let start = timed(apps[0].post_json("/api/session/start", &json!({}))).await;
    assert_eq!(start.status(), 200, "sessions go on, on local state");
    let id = start.json::<Value>().await.unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let stop = timed(apps[1].stop_session(&json!({"session_id": id}))).await;
    assert_eq!(stop.status(), 200);
    let stopped: Value = stop.json().await.unwrap();
    assert!(
        stopped["duration_seconds"].as_f64().unwrap() < 5.0,
        "from the id: {stopped}"
    );
    assert_eq!(
        timed(apps[1].get("/api/health")).await.status(),
        200,
        "health stays up"
    );
    let state = ready(&apps[0]).await;
    assert_eq!(
        state["checks"]["shared_state"]["status"], "degraded",
        "{state}"
    );
    let metrics = timed(apps[0].get("/metrics")).await.text().await.unwrap();
    assert!(metrics.contains("alchat_shared_state_up 0"));
    assert!(!metrics.contains("alchat_shared_state_failures_total 0\n"));
    // Meanwhile each replica answers with what it counted itself.
    assert!(usage(&apps[0], "").await["request_count"].as_u64().unwrap() >= 10);

    redis.restart().await;
    for app in &apps {
        eventually_within("the probe sees Redis back", Duration::from_secs(10), || {
            app.state.redis.as_ref().unwrap().is_up()
        })
        .await;
    }
    // What was counted meanwhile is merged: every replica agrees on all 30 chats.
    eventually_seeing(
        "both replicas to agree on all 30 chats",
        Duration::from_secs(5),
        || async { (usage(&apps[0], "").await, usage(&apps[1], "").await) },
        |(a, b)| a["request_count"] == 30 && totals(a) == totals(b),
    )
    .await;
    assert_eq!(usage(&apps[1], "").await["total_tokens"], 300);
    // So are today's consumers (handed over in batches, retried with their op): the guest at
    // 127.0.0.1 made all 30 chats, counted once each.
    let board = |app: &TestApp| {
        let request = app.get("/api/dashboard");
        async move { request.await.json::<Value>().await.unwrap()["consumers"].clone() }
    };
    eventually_seeing(
        "both replicas to show the guest's 30 chats",
        Duration::from_secs(5),
        || async { (board(&apps[0]).await, board(&apps[1]).await) },
        |(a, b)| a[0]["requests"] == 30 && a == b,
    )
    .await;
    assert_eq!(board(&apps[0]).await[0]["tokens"], 300);
    assert_eq!(
        ready(&apps[1]).await["checks"]["shared_state"]["status"],
        "ok"
    );
}

#[tokio::test]
async fn with_refuse_chats_under_limits_get_503_while_redis_is_down() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let app = spawn_app_with(move |c, _, _| {
        shared(c, &url);
        c.redis.as_mut().unwrap().when_unavailable = WhenStateUnavailable::Refuse;
        c.guardrails.rate.chat = std::num::NonZeroU32::new(100);
    })
    .await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    redis.kill();
    let r = timed(app.post_chat(&json!({"message": "hi"}))).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let error = crate::helpers::error_of(r).await;
    assert!(error.contains("STATE_URL"), "{error}");
    assert_eq!(app.openai.request_count(), 1, "refused before OpenAI");
    redis.restart().await;
    eventually_within("Redis back", Duration::from_secs(10), || {
        app.state.redis.as_ref().unwrap().is_up()
    })
    .await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
}

#[tokio::test]
async fn a_replica_started_while_redis_is_down_runs_and_joins_when_it_comes_up() {
    let mut redis = RedisServer::start().await;
    redis.kill();
    let url = redis.url();
    let app = spawn_app_with(move |c, _, _| shared(c, &url)).await;
    assert_eq!(
        ready(&app).await["checks"]["shared_state"]["status"],
        "degraded"
    );
    assert_eq!(
        timed(app.post_chat(&json!({"message": "hi"})))
            .await
            .status(),
        200
    );
    redis.restart().await;
    eventually_within("Redis back", Duration::from_secs(10), || {
        app.state.redis.as_ref().unwrap().is_up()
    })
    .await;
    eventually_seeing(
        "the chat counted while Redis was down to be in Redis",
        Duration::from_secs(5),
        || usage(&app, ""),
        |u| u["request_count"] == 1,
    )
    .await;
}

#[tokio::test]
async fn while_redis_is_down_replicas_still_issue_distinct_ids() {
    let mut redis = RedisServer::start().await;
    let clock = manual_clock(2026, 11, 25, 15, 0, 0, 0);
    let mut apps = Vec::new();
    for _ in 0..2 {
        let url = redis.url();
        apps.push(spawn_app_with_clock(clock.clone(), move |c, _, _| shared(c, &url)).await);
    }
    redis.kill();
    // Same second, no coordination: each replica's fallback suffix range keeps them apart.
    let a = apps[0].start_session_id().await;
    let b = apps[1].start_session_id().await;
    assert_ne!(a, b);
    for id in [&a, &b] {
        assert!(id.starts_with("session_20261125_150000_"), "{id}");
    }
    clock.set(clock.now() + chrono::Duration::seconds(30));
    let stopped: Value = apps[1]
        .stop_session(&json!({"session_id": a}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stopped["duration_seconds"], 30.0, "from the id's time");
}

#[tokio::test]
async fn every_key_carries_the_prefix_and_per_session_and_daily_keys_expire() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let app = spawn_app_with(move |c, _, _| {
        shared(c, &url);
        c.redis.as_mut().unwrap().prefix = "site-a:".into();
        c.sessions_max_age = Duration::from_secs(3600);
        c.guardrails.rate.chat = std::num::NonZeroU32::new(100);
        c.guardrails.budget.daily_tokens = Some(1_000_000);
        c.guardrails.budget.session_tokens = Some(100_000);
    })
    .await;
    let id = app.start_session_id().await;
    assert_eq!(
        app.post_chat(&json!({"message": "hi", "sessionId": id}))
            .await
            .status(),
        200
    );
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // The chat reaches Redis with the replica's next batch, within milliseconds.
    let keys: Vec<String> = eventually_seeing(
        "the session's usage key in Redis",
        Duration::from_secs(5),
        || {
            let mut conn = conn.clone();
            async move {
                redis::cmd("KEYS")
                    .arg("*")
                    .query_async::<Vec<String>>(&mut conn)
                    .await
                    .unwrap()
            }
        },
        // Usage and consumers' figures reach Redis in batches: wait for both.
        |keys| {
            keys.iter().any(|k| k.starts_with("site-a:usage:session:"))
                && keys.iter().any(|k| k.starts_with("site-a:consumers:"))
        },
    )
    .await;
    assert!(keys.iter().any(|k| k == "site-a:usage:chat"), "{keys:?}");
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| k.starts_with("site-a:")), "{keys:?}");
    for key in &keys {
        let ttl: i64 = redis::cmd("TTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let lasting = key.starts_with("site-a:usage:")
            && !key.starts_with("site-a:usage:session:")
            && !key.starts_with("site-a:usage:applied:");
        if lasting {
            assert_eq!(ttl, -1, "{key}: the service's totals are kept");
        } else if key.starts_with("site-a:usage:applied:") {
            // The marker of a chunk handed over: kept only long enough to spot a retry.
            assert!((1..=900).contains(&ttl), "{key}: {ttl}");
        } else if key.starts_with("site-a:budget:") || key.starts_with("site-a:consumers:") {
            // Daily counters (a session's cap is per day too) and the day's consumers: gone
            // the day after.
            assert!((1..=2 * 24 * 3600).contains(&ttl), "{key} expires: {ttl}");
        } else {
            // Sessions, their ledgers, the fallback pointers, id counters, rate counters.
            assert!(
                (1..=3600).contains(&ttl),
                "{key} expires within the session age bound: {ttl}"
            );
        }
    }
    assert!(keys.iter().any(|k| k.starts_with("site-a:budget:")));
    assert!(keys.iter().any(|k| k.starts_with("site-a:rate:chat:")));
    assert!(keys.iter().any(|k| k.starts_with("site-a:consumers:")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_limit_leased_in_blocks_is_never_exceeded_across_replicas() {
    let redis = RedisServer::start().await;
    // 1,000 a minute: each replica leases blocks of 10 tokens, one Redis call per block.
    let apps = replicas(2, &redis.url(), |c, _, _| {
        c.guardrails.rate.chat = std::num::NonZeroU32::new(1000);
        // Leasing is under test, not timeouts: a loaded test machine must not make Redis look
        // down (the replicas would then limit on their own, as documented).
        c.redis.as_mut().unwrap().timeout = Duration::from_secs(5);
    })
    .await;
    let chats = (0..1100).map(|i| apps[i % 2].post_chat(&json!({"message": "hi"})));
    let statuses: Vec<u16> = futures_util::future::join_all(chats)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(ok <= 1000, "never more than the limit: {ok}");
    // A block leased by one replica and not used is used by nobody: at most one per replica.
    assert!(
        ok >= 1000 - 2 * 10,
        "at most a block per replica unused: {ok}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 1100 - ok);
    // The counter in Redis moved once per block, not once per chat.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let counted: u64 = redis::cmd("GET")
        .arg("al-chat:rate:chat:127.0.0.1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(counted >= 1000 && counted % 10 == 0, "{counted}");
}

/// Quotas and the consumers' figures are shared by the replicas on Redis: 30 chats of one user
/// spread over two replicas stay within one quota, and either replica reports the same exact
/// figures (issue 28).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_quota_and_the_top_consumers_are_shared_by_two_replicas() {
    const QUOTA: u64 = 3_000;
    let redis = RedisServer::start().await;
    let apps = replicas(2, &redis.url(), |c, openai, _| {
        c.guardrails.budget.quota.user = Some(QUOTA);
        openai.set_default(crate::mock_openai::Reply::Counted(
            crate::mock_openai::Counted::long(700),
        ));
    })
    .await;
    let body = json!({"message": "a story", "username": "alice", "isGuest": false});
    let chats = (0..30).map(|i| apps[i % 2].post_chat(&body));
    let responses = futures_util::future::join_all(chats).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let refused = responses.iter().filter(|r| r.status() == 429).count();
    assert_eq!(ok + refused, 30);
    let billed: u64 = apps.iter().map(|a| a.openai.billed()).sum();
    assert!(
        billed <= QUOTA,
        "billed {billed} of one quota {QUOTA}; {}",
        crate::helpers::captured_logs()
            .lines()
            .filter(|l| l.contains("edis"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(ok >= 3, "{ok}");
    for app in &apps {
        // Each replica hands its consumers' figures to Redis within a 10 ms batch.
        let seen = usage_when(app, "?username=alice", |u| {
            u["user"]["requests"] == ok as u64
        })
        .await;
        assert_eq!(seen["user"]["tokens"], billed, "{seen}");
        assert_eq!(seen["user"]["requests"], ok as u64);
        assert_eq!(seen["user"]["quota_left"], QUOTA - billed);
        let board: Value = app.get("/api/dashboard").await.json().await.unwrap();
        assert_eq!(board["consumers"][0]["name"], "alice", "{board}");
        assert_eq!(board["consumers"][0]["tokens"], billed);
    }
}
