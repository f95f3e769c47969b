//! Fair shares (issue 28): daily token quotas per signed-in user, per guest (by address) and per
//! address, reserved and settled through the budgets' one guard. The upstream is the mock's
//! `Reply::Counted`: it counts the prompt, stops the answer at the cap it is sent, and bills
//! prompt plus answer, so "spent ≤ quota" is checked against what was really billed.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, error_of, local, manual_clock, retry_after, spawn_app_with, spawn_app_with_clock,
};
use crate::mock_openai::{Counted, Reply, StreamScript};

fn chat_from(
    app: &TestApp,
    forwarded_for: &str,
    body: &Value,
) -> impl std::future::Future<Output = reqwest::Response> + use<> {
    let request = app
        .client
        .post(format!("{}/api/chat", app.url))
        .header("x-forwarded-for", forwarded_for)
        .json(body);
    async move { request.send().await.expect("request sent") }
}

/// `GET /api/openai/usage?username=`'s `user`.
async fn user_usage(app: &TestApp, username: &str) -> Value {
    let path = format!("/api/openai/usage?username={username}");
    app.get_json(&path, None).await["user"].clone()
}

async fn dashboard(app: &TestApp) -> Value {
    app.get_json("/api/dashboard", None).await
}

/// Whether every answer was a 200 or a quota's 429 (a stream refused before it opens is a 429
/// too), and how many of each.
async fn outcomes(answers: Vec<reqwest::Response>) -> (usize, usize) {
    let mut ok = 0;
    let mut refused = 0;
    for r in answers {
        match r.status().as_u16() {
            200 => {
                // A stream's whole body, so its usage is settled before the figures are read.
                let body = r.text().await.unwrap();
                assert!(!body.contains("event: error"), "{body}");
                ok += 1;
            }
            429 => {
                assert!(
                    error_of(r)
                        .await
                        .starts_with("You have used today's allowance")
                );
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    (ok, refused)
}

/// Which quota a concurrency run sets, and who sends its chats.
#[derive(Debug, Clone, Copy)]
enum Kind {
    User,
    Guest,
    Client,
}

/// 50 concurrent chats against each kind of quota, set to fit a few: spend never passes the
/// quota, and what was counted (the consumers' figures, the quota left) is what was billed,
/// whole and streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_quota_holds_exactly_under_50_concurrent_chats_whole_and_streamed() {
    const QUOTA: u64 = 3_000;
    for kind in [Kind::User, Kind::Guest, Kind::Client] {
        for stream in [false, true] {
            let app = spawn_app_with(|c, openai, _| {
                let quota = &mut c.guardrails.budget.quota;
                match kind {
                    Kind::User => quota.user = Some(QUOTA),
                    Kind::Guest => quota.guest = Some(QUOTA),
                    Kind::Client => quota.client = Some(QUOTA),
                }
                openai.set_default(Reply::Counted(Counted::long(700)));
            })
            .await;
            let body = |i: usize| match kind {
                Kind::User => {
                    json!({"message": "a story", "username": "alice", "isGuest": false, "stream": stream})
                }
                Kind::Guest => {
                    json!({"message": "a story", "username": format!("g{i}"), "isGuest": true, "stream": stream})
                }
                // One address, five claimed names.
                Kind::Client => {
                    json!({"message": "a story", "username": format!("u{}", i % 5), "isGuest": false, "stream": stream})
                }
            };
            let answers = join_all((0..50).map(|i| app.post_chat(&body(i)))).await;
            let (ok, refused) = outcomes(answers).await;
            let run = format!("{kind:?} quota, stream {stream}");
            assert_eq!(ok + refused, 50, "{run}");
            assert!(ok >= 3, "{run}: {ok} answered");
            let billed = app.openai.billed();
            assert!(billed <= QUOTA, "{run}: billed {billed} of {QUOTA}");
            let consumers = dashboard(&app).await["consumers"].clone();
            let rows = consumers.as_array().unwrap();
            let sum = |field: &str| rows.iter().map(|c| c[field].as_u64().unwrap()).sum::<u64>();
            assert_eq!(sum("tokens"), billed, "{run}: {consumers}");
            assert_eq!(sum("requests"), ok as u64, "{run}: {consumers}");
            if !matches!(kind, Kind::Client) {
                assert_eq!(rows.len(), 1, "{run}: {consumers}");
                assert_eq!(rows[0]["quota_left"], QUOTA - billed, "{run}");
            }
            // Every call was capped: with a quota there is always an output cap.
            assert!(
                app.openai
                    .requests()
                    .iter()
                    .all(|r| crate::mock_openai::sent_cap(&r.body).is_some()),
                "{run}"
            );
        }
    }
}

#[tokio::test]
async fn one_users_quota_does_not_touch_anothers() {
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.quota.user = Some(1_000);
        openai.set_default(Reply::Counted(Counted::long(2_000)));
    })
    .await;
    let as_user = |name: &str| json!({"message": "hi", "username": name, "isGuest": false});
    // The first chat's answer takes all the room its prompt leaves (the cap is lowered to it).
    assert_eq!(app.post_chat(&as_user("alice")).await.status(), 200);
    let refused = app.post_chat(&as_user("alice")).await;
    assert_eq!(refused.status(), 429);
    assert!(retry_after(&refused) >= 1);
    assert!(
        error_of(refused)
            .await
            .contains("allowance of 1000 tokens (per user)")
    );
    assert_eq!(app.post_chat(&as_user("bob")).await.status(), 200);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("alchat_guardrail_refusals_total{guardrail=\"quota\"} 1"),
        "a refusal reason of its own: {}",
        metrics
            .lines()
            .filter(|l| l.contains("refus"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(user_usage(&app, "alice").await["quota_left"], 0);
    assert_eq!(user_usage(&app, "bob").await["quota_left"], 0);
    assert_eq!(user_usage(&app, "carol").await["quota_left"], 1_000);
    // Quotas are not budgets: the usage answer has no `budget` without one.
    let usage = app.get_json("/api/openai/usage", None).await;
    assert!(usage.get("budget").is_none(), "{usage}");
}

/// A guest is keyed by its address: two guests behind one address share one quota whatever
/// usernames they claim, two addresses do not; behind a trusted proxy the address is the one
/// `X-Forwarded-For` names.
#[tokio::test]
async fn guests_behind_one_address_share_a_quota_and_two_addresses_do_not() {
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.quota.guest = Some(1_000);
        c.guardrails.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        openai.set_default(Reply::Counted(Counted::long(2_000)));
    })
    .await;
    let guest = |name: &str| json!({"message": "hi", "username": name, "isGuest": true});
    assert_eq!(
        chat_from(&app, "198.51.100.7", &guest("guest"))
            .await
            .status(),
        200
    );
    let second = chat_from(&app, "198.51.100.7", &guest("someone-else")).await;
    assert_eq!(second.status(), 429, "the same address, another name");
    assert!(error_of(second).await.contains("(per guest)"));
    assert_eq!(
        chat_from(&app, "198.51.100.8", &guest("guest"))
            .await
            .status(),
        200,
        "another address"
    );
    // Signed-in users have no guest quota.
    let user = json!({"message": "hi", "username": "ana", "isGuest": false});
    assert_eq!(chat_from(&app, "198.51.100.7", &user).await.status(), 200);
    // The dashboard shows the guests by masked address.
    let board = dashboard(&app).await;
    let guests: Vec<&Value> = board["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "guest")
        .collect();
    assert_eq!(guests.len(), 2, "{board}");
    assert!(
        guests.iter().all(|g| g["name"] == "198.51.100.*"),
        "{board}"
    );
    assert!(guests.iter().all(|g| g["quota_left"] == 0), "{board}");
    assert!(!board.to_string().contains("198.51.100.7"));
}

/// `QUOTA_CLIENT_DAILY_TOKENS` counts an address whoever it claims to be.
#[tokio::test]
async fn an_address_quota_holds_whatever_names_it_claims() {
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.quota.client = Some(1_000);
        c.guardrails.budget.quota.user = Some(1_000_000);
        openai.set_default(Reply::Counted(Counted::long(2_000)));
    })
    .await;
    let as_user = |name: &str| json!({"message": "hi", "username": name, "isGuest": false});
    assert_eq!(app.post_chat(&as_user("u1")).await.status(), 200);
    let refused = app.post_chat(&as_user("u2")).await;
    assert_eq!(refused.status(), 429);
    assert!(error_of(refused).await.contains("(per address)"));
}

/// Quotas reset at local midnight (the manual clock), and the sentence says when.
#[tokio::test]
async fn a_spent_quota_resets_at_local_midnight() {
    let clock = manual_clock(2026, 12, 7, 23, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |c, openai, _| {
        c.guardrails.budget.quota.user = Some(1_000);
        openai.set_default(Reply::Counted(Counted::long(2_000)));
    })
    .await;
    let body = json!({"message": "hi", "username": "alice", "isGuest": false});
    assert_eq!(app.post_chat(&body).await.status(), 200);
    let refused = app.post_chat(&body).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(retry_after(&refused), 3600);
    assert_eq!(
        error_of(refused).await,
        "You have used today's allowance of 1000 tokens (per user); it resets at 2026-12-08T00:00:00.000000. Try again then."
    );
    clock.set(local(2026, 12, 8, 0, 0, 1, 0));
    assert_eq!(app.post_chat(&body).await.status(), 200);
    let alice = user_usage(&app, "alice").await;
    assert_eq!(alice["requests"], 1, "a new day's figures: {alice}");
}

/// Today's top consumers, largest first, bounded to 20; one user's figures only with the admin
/// token when one is set.
#[tokio::test]
async fn the_dashboard_lists_the_top_20_consumers_and_one_users_usage_needs_the_admin_token() {
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.admin_token = Some("adm1n".into());
        openai.set_default(Reply::text("ok", 10_000, 5_000));
    })
    .await;
    for i in 0..25 {
        for _ in 0..=(i % 3) {
            let body = json!({"message": "hi", "username": format!("user{i}"), "isGuest": false});
            assert_eq!(app.post_chat(&body).await.status(), 200);
        }
    }
    let board = app.get_json("/api/dashboard", Some("adm1n")).await;
    let consumers = board["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 20);
    let tokens: Vec<u64> = consumers
        .iter()
        .map(|c| c["tokens"].as_u64().unwrap())
        .collect();
    assert!(tokens.windows(2).all(|w| w[0] >= w[1]), "{tokens:?}");
    assert_eq!(tokens[0], 45_000, "three chats of 15,000 tokens");
    assert_eq!(consumers[0]["quota_left"], Value::Null, "no quota set");
    // gpt-3.5-turbo: 10,000 prompt tokens at $0.50/M and 5,000 answer tokens at $1.50/M, thrice.
    assert_eq!(consumers[0]["cost_usd"], 0.0375);

    let open = app.get("/api/openai/usage?username=user2").await;
    assert_eq!(open.status(), 401, "one user's usage is the operator's");
    let seen = app
        .get_json("/api/openai/usage?username=user2", Some("adm1n"))
        .await;
    assert_eq!(seen["user"]["name"], "user2");
    assert_eq!(seen["user"]["tokens"], 45_000);
    assert_eq!(seen["user"]["requests"], 3);
    // The totals stay open, as the website reads them.
    assert_eq!(app.get("/api/openai/usage").await.status(), 200);
}

/// A stream the client abandons settles its estimate against the quota and the consumer's
/// figures alike: closing streams early is no way around a quota.
#[tokio::test]
async fn an_abandoned_stream_counts_against_the_quota() {
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.quota.user = Some(100_000);
        // One delta, then silence: the usage never comes.
        openai.set_default(Reply::Stream(StreamScript {
            deltas: vec!["hello world".into()],
            usage: Some((9, 4)),
            stall: true,
            ..Default::default()
        }));
    })
    .await;
    let body = json!({"message": "hi", "username": "alice", "isGuest": false, "stream": true});
    let mut response = app.post_chat(&body).await;
    let mut seen = String::new();
    while !seen.contains("event: delta") {
        let chunk = response.chunk().await.unwrap().expect("a delta");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);
    let alice = crate::helpers::eventually_seeing(
        "the abandoned stream's estimate",
        Duration::from_secs(10),
        || user_usage(&app, "alice"),
        |alice| alice["requests"] == 1,
    )
    .await;
    let tokens = alice["tokens"].as_u64().unwrap();
    assert!(tokens > 0, "{alice}");
    assert_eq!(
        alice["quota_left"].as_u64().unwrap(),
        100_000 - tokens,
        "the quota counted what the figures did: {alice}"
    );
}
