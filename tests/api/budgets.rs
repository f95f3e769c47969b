//! Budgets that cannot be overshot (issue 26): each probe a hostile or unlucky client ran
//! against the release binary, with its figure as the bound. The upstream is the mock's
//! `Reply::Counted`, which behaves as OpenAI does: it counts the prompt with the model's
//! encoding, stops the answer at the cap it is sent, and bills prompt plus answer.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually_seeing, spawn_app_with};
use crate::mock_openai::{Counted, Reply, openai_prompt_tokens, sent_cap};

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

/// 20,000 distinct session ids cannot push the day's counter out of a bounded store: with
/// `SESSION_MAX_TRACKED=100` the day's counter was evicted after 100 sessions and restarted at 0.
#[tokio::test]
async fn twenty_thousand_session_ids_cannot_evict_the_daily_counter() {
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
    for batch in 0..(20_000 / 50) {
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
