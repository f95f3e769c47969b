//! Conversations that never outgrow the model (issue 26): the site sends the whole history with
//! every chat, so past the model's context window OpenAI answered 400 `context_length_exceeded`
//! and the chat window was stuck for the rest of the conversation. The mock upstream refuses
//! exactly as OpenAI does (`Counted::context_window`).

use std::io::Write;

use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually, spawn_app_with};
use crate::mock_openai::{Counted, Reply, openai_prompt_tokens, sent_cap};

const WINDOW: u64 = 400;
const MODEL: &str = "gpt-4-small";

/// A price table naming a model with a 400-token window (cl100k: a gpt-4 family name, so the
/// mock, which counts by family as OpenAI does, agrees).
fn pricing() -> al_chat::domain::pricing::PriceTable {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    write!(
        file,
        r#"{{"fallback": "{MODEL}", "models": {{"{MODEL}": {{"input": 1.0, "output": 2.0, "context_window": {WINDOW}, "tokenizer": "cl100k_base"}}}}}}"#
    )
    .unwrap();
    al_chat::domain::pricing::PriceTable::load(Some(file.path())).unwrap()
}

async fn app(trim: bool) -> TestApp {
    spawn_app_with(|c, openai, _| {
        c.pricing = pricing();
        c.openai.model = MODEL.into();
        c.guardrails.history_trim = trim;
        c.guardrails.allowed_models = Some("*".into());
        openai.set_default(Reply::Counted(Counted {
            context_window: Some(WINDOW),
            ..Counted::long(20)
        }));
    })
    .await
}

/// 30 turns of about 20 tokens each: about 750 tokens, past the window.
fn long_history() -> Vec<Value> {
    (0..30)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            json!({"role": role, "content": format!("turn {i}: the quick brown fox jumps over the lazy dog again and again")})
        })
        .collect()
}

#[tokio::test]
async fn a_long_conversation_loses_its_oldest_turns_and_is_answered() {
    let app = app(true).await;
    let session = app.start_session_id().await;
    let mut history = vec![json!({"role": "system", "content": "You are AL-Chat."})];
    history.extend(long_history());
    let answer = app
        .post_chat(&json!({"message": "and now?", "history": history, "sessionId": session}))
        .await;
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    let trimmed = answer["history_trimmed"].as_u64().expect("history_trimmed");
    assert!(trimmed > 0 && trimmed < 30, "{answer}");

    let sent = &app.openai.requests()[0].body;
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(
        messages[0]["content"], "You are AL-Chat.",
        "the system message is kept"
    );
    assert_eq!(
        messages.last().unwrap()["content"],
        "and now?",
        "the current message is kept"
    );
    assert_eq!(messages.len() as u64, 1 + 30 - trimmed + 1);
    assert_eq!(
        messages[1]["content"],
        format!("turn {trimmed}: the quick brown fox jumps over the lazy dog again and again"),
        "the oldest turns went first"
    );
    // No cap is sent: a quarter of the window was kept for the answer.
    assert_eq!(sent_cap(sent), None);
    assert!(openai_prompt_tokens(MODEL, sent) + WINDOW / 4 <= WINDOW);

    let date = chrono::Local::now().format("%Y-%m-%d").to_string();
    eventually("the chat_usage line", || {
        app.log_lines(&date).iter().any(|l| {
            l["metric_name"] == "chat_usage" && l["metric_value"]["history_trimmed"] == trimmed
        })
    })
    .await;
}

#[tokio::test]
async fn streamed_answers_say_it_too() {
    let app = app(true).await;
    let text = app
        .post_chat(&json!({"message": "and now?", "history": long_history(), "stream": true}))
        .await
        .text()
        .await
        .unwrap();
    let done = text
        .split("event: done\ndata: ")
        .nth(1)
        .expect("a done event");
    let done: Value = serde_json::from_str(done.lines().next().unwrap()).unwrap();
    assert!(done["history_trimmed"].as_u64().unwrap() > 0, "{done}");
}

#[tokio::test]
async fn a_conversation_that_fits_is_sent_whole() {
    let app = app(true).await;
    let history = &long_history()[..4];
    let answer: Value = app
        .post_chat(&json!({"message": "short", "history": history}))
        .await
        .json()
        .await
        .unwrap();
    assert!(answer.get("history_trimmed").is_none(), "{answer}");
    assert_eq!(messages_sent(&app), 5);
}

#[tokio::test]
async fn a_message_too_long_for_the_model_alone_gets_413_naming_the_limit() {
    let app = app(true).await;
    let answer = app
        .post_chat(&json!({"message": "word ".repeat(1_000), "history": long_history()}))
        .await;
    assert_eq!(answer.status(), 413);
    let error = crate::helpers::error_of(answer).await;
    assert!(error.contains(&format!("{WINDOW} tokens")), "{error}");
    assert!(error.contains(MODEL), "{error}");
    assert_eq!(app.openai.request_count(), 0, "nothing was sent");
}

/// `HISTORY_TRIM=off`: sent whole; OpenAI's refusal becomes a sentence, not its raw text.
#[tokio::test]
async fn with_trimming_off_the_upstream_refusal_is_a_clear_sentence() {
    let app = app(false).await;
    let answer = app
        .post_chat(&json!({"message": "and now?", "history": long_history()}))
        .await;
    assert_eq!(answer.status(), 400);
    let error = crate::helpers::error_of(answer).await;
    assert!(
        error.contains("too long for the model's context window"),
        "{error}"
    );
    assert!(
        !error.contains("maximum context length"),
        "not OpenAI's text: {error}"
    );
    assert_eq!(messages_sent(&app), 31);
}

/// With every setting at its default: ten 1 MB files (what the chat window may attach) pass
/// gpt-3.5-turbo's window, which OpenAI would refuse; this says so in a sentence, before any call.
/// Runs without whitespace are bounded by their bytes, so counting them is linear (one 1 MB run
/// took seconds of CPU exactly counted).
#[tokio::test]
async fn ten_one_megabyte_files_get_the_models_limit_with_the_defaults() {
    let app = crate::helpers::spawn_app().await;
    let files: Vec<Value> = (0..10)
        .map(|i| json!({"name": format!("f{i}.txt"), "content": "y".repeat(1_000_000)}))
        .collect();
    let answer = app
        .post_chat(&json!({"message": "compare", "attached_files": files}))
        .await;
    assert_eq!(answer.status(), 413);
    let error = crate::helpers::error_of(answer).await;
    assert!(
        error.contains("gpt-3.5-turbo") && error.contains("16385 tokens"),
        "{error}"
    );
    assert_eq!(app.openai.request_count(), 0);
}

/// A cap above the model's window does not refuse every chat: the answer's room for fitting is
/// at most half the window.
#[tokio::test]
async fn a_cap_larger_than_the_window_still_lets_short_chats_through() {
    let app = spawn_app_with(|c, openai, _| {
        c.pricing = pricing();
        c.openai.model = MODEL.into();
        c.openai.max_output_tokens = Some(10_000);
        c.guardrails.allowed_models = Some("*".into());
        openai.set_default(Reply::Counted(Counted::long(20)));
    })
    .await;
    let answer = app.post_chat(&json!({"message": "short"})).await;
    assert_eq!(answer.status(), 200);
}

/// How many messages the first call upstream carried.
fn messages_sent(app: &crate::helpers::TestApp) -> usize {
    app.openai.requests()[0].body["messages"]
        .as_array()
        .map_or(0, Vec::len)
}
