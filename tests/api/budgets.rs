//! Budgets that cannot be overshot (issue 26): each probe a hostile or unlucky client ran
//! against the release binary, with its figure as the bound. The upstream is the mock's
//! `Reply::Counted`, which behaves as OpenAI does: it counts the prompt with the model's
//! encoding, stops the answer at the cap it is sent, and bills prompt plus answer.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually_seeing, spawn_app_with};
use crate::mock_openai::{Counted, Reply, StreamScript, openai_prompt_tokens, sent_cap};

async fn budget(app: &TestApp) -> Value {
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    usage["budget"].clone()
}

async fn spent_tokens(app: &TestApp) -> u64 {
    budget(app).await["spent"]["daily_tokens"].as_u64().unwrap()
}

/// 30 concurrent chats, each with a history of 25,000 one-character items: an estimate by
/// characters reserved 7,253 tokens for each and they used 25,005; 27 got in and spent 675,135
/// against a cap of 200,000 (3.4x). Counted exactly, spend stays under the cap.
#[tokio::test]
async fn histories_of_tiny_items_cannot_overshoot_the_daily_tokens() {
    const CAP: u64 = 200_000;
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.daily_tokens = Some(CAP);
        // The mock counts 25,000 messages per chat in a debug build: give it time.
        c.openai.timeout = Duration::from_secs(60);
        openai.set_default(Reply::Counted(Counted::long(2_000)));
    })
    .await;
    let history: Vec<Value> = (0..25_000)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": "a"}))
        .collect();
    let body = json!({"message": "go", "history": history});
    let answers = join_all((0..30).map(|_| app.post_chat(&body))).await;
    let statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        ok + refused,
        30,
        "every chat answered or refused by the budget: {statuses:?}"
    );
    assert!(ok >= 1, "one fits: 125,000 prompt tokens and its answer");
    let spent = spent_tokens(&app).await;
    assert!(spent <= CAP, "spent {spent} of a {CAP} cap");
    assert_eq!(
        spent,
        app.openai.billed(),
        "what was counted is what was billed"
    );
}

/// No budget and no cap: nothing is sent, exactly as Flask sent nothing.
#[tokio::test]
async fn without_budget_or_cap_no_output_cap_is_sent() {
    let app = spawn_app_with(|_, _, _| {}).await;
    assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
    let sent = &app.openai.requests()[0].body;
    assert!(
        sent.get("max_tokens").is_none() && sent.get("max_completion_tokens").is_none(),
        "{sent}"
    );
}

/// `OPENAI_MAX_OUTPUT_TOKENS` bounds the answer upstream, in the field the server takes, and an
/// answer stopped there says `truncated`, whole and streamed.
#[tokio::test]
async fn the_output_cap_is_sent_and_a_capped_answer_says_truncated() {
    let app = spawn_app_with(|c, openai, _| {
        c.openai.max_output_tokens = Some(50);
        openai.set_default(Reply::Counted(Counted::long(500)));
    })
    .await;
    let whole: Value = app
        .post_chat(&json!({"message": "a long story"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(whole["truncated"], true, "{whole}");
    assert_eq!(whole["usage"]["completion_tokens"], 50);
    assert_eq!(sent_cap(&app.openai.requests()[0].body), Some(50));
    let streamed = app
        .post_chat(&json!({"message": "a long story", "stream": true}))
        .await
        .text()
        .await
        .unwrap();
    let done = streamed
        .split("event: done\ndata: ")
        .nth(1)
        .expect("a done event");
    let done: Value = serde_json::from_str(done.lines().next().unwrap()).unwrap();
    assert_eq!(done["truncated"], true, "{done}");
    assert_eq!(done["usage"]["completion_tokens"], 50);

    let short: Value = {
        app.openai.enqueue(Reply::Counted(Counted::long(5)));
        app.post_chat(&json!({"message": "hi"}))
            .await
            .json()
            .await
            .unwrap()
    };
    assert!(short.get("truncated").is_none(), "only when cut: {short}");
}

#[tokio::test]
async fn the_cap_goes_in_the_field_the_server_takes() {
    use al_chat::config::CapField;
    for (field, name, other) in [
        (
            CapField::MaxCompletionTokens,
            "max_completion_tokens",
            "max_tokens",
        ),
        (CapField::MaxTokens, "max_tokens", "max_completion_tokens"),
    ] {
        let app = spawn_app_with(|c, _, _| {
            c.openai.max_output_tokens = Some(70);
            c.openai.cap_field = field;
        })
        .await;
        assert_eq!(app.post_chat(&json!({"message": "hi"})).await.status(), 200);
        let sent = &app.openai.requests()[0].body;
        assert_eq!(sent[name], 70, "{sent}");
        assert!(sent.get(other).is_none(), "{sent}");
    }
}

/// With less room than prompt plus cap, the cap is lowered to the room left (the answer says
/// `truncated` when it reaches it); refused only when the prompt and a minimal answer do not fit.
#[tokio::test]
async fn the_last_room_is_used_and_then_refused() {
    const CAP: u64 = 300;
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.daily_tokens = Some(CAP);
        c.openai.max_output_tokens = Some(200);
        c.openai.min_output_tokens = 64;
        openai.set_default(Reply::Counted(Counted::long(1_000)));
    })
    .await;
    let body = json!({"message": "tell me everything"});
    let prompt = openai_prompt_tokens(
        "gpt-3.5-turbo",
        &json!({"messages": [{"content": "tell me everything"}]}),
    );
    let first: Value = app.post_chat(&body).await.json().await.unwrap();
    assert_eq!(
        first["usage"]["completion_tokens"], 200,
        "the whole cap fits"
    );
    let second: Value = app.post_chat(&body).await.json().await.unwrap();
    let room = CAP - (prompt + 200) - prompt;
    assert_eq!(
        second["usage"]["completion_tokens"], room,
        "lowered to the room left"
    );
    assert_eq!(second["truncated"], true);
    assert_eq!(sent_cap(&app.openai.requests()[1].body), Some(room));
    let third = app.post_chat(&body).await;
    assert_eq!(third.status(), 429, "not even a minimal answer fits");
    assert_eq!(
        spent_tokens(&app).await,
        CAP,
        "every token of the cap used, none past it"
    );
}

/// CJK and emoji text: a character is several tokens in some encodings; counted, not guessed.
#[tokio::test]
async fn cjk_and_emoji_are_counted_exactly() {
    const CAP: u64 = 5_000;
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.daily_tokens = Some(CAP);
        c.openai.max_output_tokens = Some(100);
        openai.set_default(Reply::Counted(Counted::long(400)));
    })
    .await;
    let text = "日本語のテキストと絵文字🎉✨🚀 ".repeat(40);
    let mut answered = 0;
    for _ in 0..30 {
        match app
            .post_chat(&json!({"message": text, "model": "gpt-4o"}))
            .await
            .status()
            .as_u16()
        {
            200 => answered += 1,
            429 => break,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(answered >= 2);
    let spent = spent_tokens(&app).await;
    assert!(spent <= CAP, "spent {spent}");
    assert_eq!(spent, app.openai.billed());
}

/// 100 concurrent chats, half streamed, against a cap that fits a fraction of them.
#[tokio::test]
async fn a_hundred_concurrent_chats_whole_and_streamed_stay_under_the_cap() {
    const CAP: u64 = 20_000;
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.daily_tokens = Some(CAP);
        c.openai.max_output_tokens = Some(500);
        openai.set_default(Reply::Counted(Counted::long(2_000)));
    })
    .await;
    let answers = join_all((0..100).map(|i| {
        let app = &app;
        async move {
            let response = app
                .post_chat(&json!({"message": format!("story {i}"), "stream": i % 2 == 0}))
                .await;
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    }))
    .await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    assert!(ok >= 30, "{ok} answered");
    assert!(answers.iter().all(|(s, _)| *s == 200 || *s == 429));
    let spent = spent_tokens(&app).await;
    assert!(spent <= CAP, "spent {spent} of {CAP}");
    assert_eq!(spent, app.openai.billed());
}

/// `/api/openai/test` reserves and settles like a chat: forty connection tests cut by their
/// clients once left reservations nobody settled, and every chat got 429 until midnight.
#[tokio::test]
async fn connection_tests_cut_by_their_clients_leave_no_stuck_reservation() {
    const CAP: u64 = 20_000;
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.daily_tokens = Some(CAP);
        openai.set_default(Reply::Counted(Counted {
            delay: Duration::from_millis(400),
            ..Counted::long(10)
        }));
    })
    .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    for _ in 0..40 {
        let cut = client
            .get(format!("{}/api/openai/test", app.url))
            .send()
            .await;
        assert!(cut.is_err(), "the client gave up");
    }
    // Each kept its whole reservation (the upstream may have billed it): prompt plus its cap of 16.
    let test_prompt = openai_prompt_tokens(
        "gpt-3.5-turbo",
        &json!({"messages": [{"content": al_chat_test_prompt()}]}),
    );
    let spent = eventually_seeing(
        "the cut tests' reservations",
        Duration::from_secs(10),
        || spent_tokens(&app),
        |spent| *spent == 40 * (test_prompt + 16),
    )
    .await;
    assert!(spent <= CAP);
    assert_eq!(
        app.post_chat(&json!({"message": "still open?"}))
            .await
            .status(),
        200
    );
    assert_eq!(
        sent_cap(&app.openai.requests()[0].body),
        Some(16),
        "a test's own small cap"
    );
}

fn al_chat_test_prompt() -> &'static str {
    "Say 'Connection successful' if you can read this."
}

/// Distinct session ids cannot push the day's counter out of a bounded store: with
/// `SESSION_MAX_TRACKED=100` the day's counter was evicted after 100 sessions and restarted at 0
/// (150 chats spent 3,646 tokens against 3,000). Over HTTP: 2,000 ids, twenty times the bound
/// (20,000 over HTTP cost 18 s of CPU in a debug build, which starved the suite's timing
/// tests); the store itself takes 20,000 in `guardrails::budget`'s unit test.
#[tokio::test]
async fn thousands_of_session_ids_cannot_evict_the_daily_counter() {
    const CAP: u64 = 3_000;
    let app = spawn_app_with(|c, openai, _| {
        c.sessions_max = std::num::NonZeroUsize::new(100).unwrap();
        c.guardrails.budget.daily_tokens = Some(CAP);
        c.guardrails.budget.session_tokens = Some(2_000);
        c.openai.max_output_tokens = Some(4);
        c.openai.min_output_tokens = 1;
        openai.set_default(Reply::Counted(Counted::long(2)));
    })
    .await;
    let client = reqwest::Client::new();
    let mut answered = 0;
    for batch in 0..(2_000 / 50) {
        let sends = (0..50).map(|i| {
            client
                .post(format!("{}/api/chat", app.url))
                .header("X-Session-ID", format!("session_{batch}_{i}"))
                .json(&json!({"message": "hi"}))
                .send()
        });
        for response in join_all(sends).await {
            match response.unwrap().status().as_u16() {
                200 => answered += 1,
                429 => {}
                other => panic!("unexpected {other}"),
            }
        }
    }
    assert!(
        answered > 100,
        "more sessions than the store keeps got in: {answered}"
    );
    let spent = spent_tokens(&app).await;
    assert!(spent <= CAP, "spent {spent} of {CAP}");
    assert_eq!(spent, app.openai.billed());
}

/// `OPENAI_TIMEOUT_SECS=1` and a slow upstream: the request was sent and may have been billed,
/// so its reservation stays whole (it was released, counting a billed call as nothing). A
/// refused connection or a 4xx was provably not processed and is released.
#[tokio::test]
async fn a_timed_out_call_keeps_its_reservation_and_a_refused_one_is_released() {
    const CAP: u64 = 100_000;
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.daily_tokens = Some(CAP);
        c.openai.timeout = Duration::from_secs(1);
        c.openai.max_output_tokens = Some(300);
        openai.set_default(Reply::Counted(Counted {
            delay: Duration::from_secs(3),
            ..Counted::long(10)
        }));
    })
    .await;
    let body = json!({"message": "slow"});
    let prompt = openai_prompt_tokens("gpt-3.5-turbo", &json!({"messages": [{"content": "slow"}]}));
    assert_eq!(app.post_chat(&body).await.status(), 504);
    assert_eq!(
        spent_tokens(&app).await,
        prompt + 300,
        "the whole reservation"
    );

    app.openai.enqueue(Reply::status(400, "bad request"));
    assert_eq!(app.post_chat(&body).await.status(), 400);
    assert_eq!(spent_tokens(&app).await, prompt + 300, "a 4xx is released");
}

/// A stream that stalls past `OPENAI_STREAM_IDLE_TIMEOUT_SECS` was sent and partly answered:
/// it settles what was seen (the prompt plus the streamed text), never more than it reserved.
#[tokio::test]
async fn a_stalled_stream_settles_what_it_saw() {
    const CAP: u64 = 100_000;
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.daily_tokens = Some(CAP);
        c.openai.max_output_tokens = Some(300);
        c.openai.stream_idle_timeout = Duration::from_millis(300);
        openai.set_default(Reply::Stream(StreamScript {
            deltas: vec!["one ".into(), "two ".into(), "three".into()],
            usage: Some((9, 3)),
            stall: true,
            ..Default::default()
        }));
    })
    .await;
    let text = app
        .post_chat(&json!({"message": "stall", "stream": true}))
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains("event: error"), "{text}");
    let prompt = openai_prompt_tokens(
        "gpt-3.5-turbo",
        &json!({"messages": [{"content": "stall"}]}),
    );
    let seen = "one two three".len() as u64;
    let spent = eventually_seeing(
        "the stalled stream's settlement",
        Duration::from_secs(5),
        || spent_tokens(&app),
        |spent| *spent < prompt + 300,
    )
    .await;
    assert_eq!(
        spent,
        prompt + seen,
        "the prompt and the text seen, in bytes"
    );
}

/// An answer without `usage` (OpenAI-compatible servers) is counted with the tokenizer and
/// flagged, instead of settling at 0.
#[tokio::test]
async fn an_answer_without_usage_is_counted_and_flagged() {
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.daily_tokens = Some(100_000);
        openai.set_default(Reply::Counted(Counted {
            usage: false,
            ..Counted::long(25)
        }));
    })
    .await;
    let answer: Value = app
        .post_chat(&json!({"message": "count me"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["estimated"], true, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 25);
    assert_eq!(spent_tokens(&app).await, app.openai.billed());
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();
    assert_eq!(usage["estimated_usage"]["request_count"], 1);
    assert_eq!(
        usage["request_count"], 0,
        "the contract's totals stay as OpenAI reported"
    );
}

/// Clients that leave, whole and streamed, against a cap that then runs out: each call that
/// reached the upstream keeps its whole reservation (whole) or settles what it saw (streamed),
/// never more than it reserved, so spend ends at most the cap.
#[tokio::test]
async fn clients_that_leave_never_push_spend_past_the_cap() {
    const CAP: u64 = 6_000;
    let app = spawn_app_with(|c, openai, _| {
        c.guardrails.budget.daily_tokens = Some(CAP);
        c.openai.max_output_tokens = Some(300);
        openai.set_default(Reply::Counted(Counted {
            delay: Duration::from_millis(300),
            ..Counted::long(1_000)
        }));
    })
    .await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    for i in 0..5 {
        let body = json!({"message": format!("whole {i}")});
        let gone = impatient
            .post(format!("{}/api/chat", app.url))
            .json(&body)
            .send()
            .await;
        assert!(gone.is_err(), "the client left");
    }
    for i in 0..5 {
        let body = json!({"message": format!("streamed {i}"), "stream": true});
        let mut response = app.post_chat(&body).await;
        // The first delta, then away.
        while let Some(chunk) = response.chunk().await.unwrap() {
            if String::from_utf8_lossy(&chunk).contains("event: delta") {
                break;
            }
        }
    }
    let mut statuses = Vec::new();
    for i in 0..40 {
        let status = app
            .post_chat(&json!({"message": format!("stay {i}")}))
            .await
            .status();
        statuses.push(status.as_u16());
        if status == 429 {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&429), "the cap ran out: {statuses:?}");
    let spent = eventually_seeing(
        "every reservation settled",
        Duration::from_secs(10),
        || spent_tokens(&app),
        |_| app.openai.abandoned() >= 5,
    )
    .await;
    assert!(spent <= CAP, "spent {spent} of {CAP}");
}

mod with_redis {
    //! With Redis, a reservation settles where it was taken: no undercount and no double count
    //! across a flap, in either direction, against a real redis-server.

    use std::time::Duration;

    use al_chat::config::{RedisSettings, WhenStateUnavailable};
    use serde_json::{Value, json};

    use super::spent_tokens;
    use crate::helpers::{TestApp, eventually_seeing, spawn_app_with};
    use crate::mock_openai::{Counted, Reply, openai_prompt_tokens};
    use crate::redis_server::RedisServer;

    const CAP: u64 = 10_000;

    async fn app(redis: &RedisServer) -> TestApp {
        let url = redis.url();
        spawn_app_with(move |c, openai, _| {
            c.redis = Some(RedisSettings {
                url: url.clone().into(),
                prefix: "al-chat:".into(),
                when_unavailable: WhenStateUnavailable::Local,
                timeout: Duration::from_millis(250),
            });
            c.guardrails.budget.daily_tokens = Some(CAP);
            c.openai.max_output_tokens = Some(300);
            openai.set_default(Reply::Counted(Counted::long(20)));
        })
        .await
    }

    /// The day's token counter as Redis holds it (0 when absent).
    async fn on_redis(redis: &RedisServer) -> u64 {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let day = chrono::Local::now().format("%Y-%m-%d");
        let value: Option<f64> = redis::cmd("GET")
            .arg(format!("al-chat:budget:{day}|tokens"))
            .query_async(&mut conn)
            .await
            .unwrap();
        value.unwrap_or(0.0).round() as u64
    }

    fn slow_counted() -> Reply {
        Reply::Counted(Counted {
            delay: Duration::from_millis(1_500),
            ..Counted::long(20)
        })
    }

    async fn redis_is_back(app: &TestApp) {
        eventually_seeing(
            "the app to see Redis again",
            Duration::from_secs(10),
            || async {
                let ready: Value = app.get("/api/ready").await.json().await.unwrap();
                ready["checks"]["shared_state"]["status"].clone()
            },
            |status| status == "ok",
        )
        .await;
    }

    fn prompt(message: &str) -> u64 {
        openai_prompt_tokens(
            "gpt-3.5-turbo",
            &json!({"messages": [{"content": message}]}),
        )
    }

    /// Reserved on Redis, settled while Redis is down: the correction waits and is replayed with
    /// the next settlement that reaches Redis, so Redis ends holding exactly what was billed.
    #[tokio::test]
    async fn a_reservation_taken_on_redis_and_settled_while_it_is_down_is_corrected_later() {
        let mut redis = RedisServer::start().await;
        let app = app(&redis).await;
        app.openai.enqueue(slow_counted());
        let chat = tokio::spawn(app.post_chat(&json!({"message": "first"})));
        eventually_seeing(
            "the reservation on Redis",
            Duration::from_secs(5),
            || on_redis(&redis),
            |n| *n == prompt("first") + 300,
        )
        .await;
        redis.kill();
        assert_eq!(chat.await.unwrap().status(), 200);
        redis.restart().await;
        assert_eq!(
            on_redis(&redis).await,
            prompt("first") + 300,
            "until the replay Redis holds the whole reservation (an overcount)"
        );
        redis_is_back(&app).await;
        assert_eq!(
            app.post_chat(&json!({"message": "second"})).await.status(),
            200
        );
        let billed = app.openai.billed();
        assert_eq!(billed, prompt("first") + 20 + prompt("second") + 20);
        assert_eq!(
            on_redis(&redis).await,
            billed,
            "no undercount, no double count"
        );
        assert!(spent_tokens(&app).await <= CAP);
    }

    /// Reserved locally while Redis is down, settled after it is back: settled locally, so
    /// Redis (which never counted it) is not corrected for it. Settling it on Redis took its
    /// difference off what other chats had spent there: an undercount.
    #[tokio::test]
    async fn a_reservation_taken_locally_while_redis_is_down_never_corrects_redis() {
        let mut redis = RedisServer::start().await;
        let app = app(&redis).await;
        assert_eq!(
            app.post_chat(&json!({"message": "before"})).await.status(),
            200
        );
        let before = prompt("before") + 20;
        assert_eq!(on_redis(&redis).await, before);
        redis.kill();
        app.openai.enqueue(slow_counted());
        let chat = tokio::spawn(app.post_chat(&json!({"message": "during"})));
        eventually_seeing(
            "the chat to reach the upstream",
            Duration::from_secs(5),
            || async { app.openai.request_count() },
            |n| *n == 2,
        )
        .await;
        redis.restart().await;
        redis_is_back(&app).await;
        assert_eq!(chat.await.unwrap().status(), 200);
        assert_eq!(
            on_redis(&redis).await,
            before,
            "Redis keeps what it counted"
        );
        assert_eq!(
            app.post_chat(&json!({"message": "after"})).await.status(),
            200
        );
        assert_eq!(on_redis(&redis).await, before + prompt("after") + 20);
        assert!(spent_tokens(&app).await <= CAP);
    }
}
