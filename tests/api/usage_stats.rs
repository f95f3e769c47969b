//! Contract §8: usage statistics and costs.

use std::io::Write;

use serde_json::{Value, json};

use crate::helpers::{spawn_app, spawn_app_with};
use crate::mock_openai::Reply;

async fn usage(app: &crate::helpers::TestApp, query: &str) -> Value {
    let r = app.get(&format!("/api/openai/usage{query}")).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn fresh_usage_has_every_contract_field() {
    let app = spawn_app().await;
    app.wait_configured(true).await;
    let u = usage(&app, "").await;
    for (field, value) in [
        ("total_prompt_tokens", json!(0)),
        ("total_completion_tokens", json!(0)),
        ("total_tokens", json!(0)),
        ("request_count", json!(0)),
        ("model", json!("gpt-3.5-turbo")),
        ("estimated_cost_usd", json!(0.0)),
        ("prompt_cost_usd", json!(0.0)),
        ("completion_cost_usd", json!(0.0)),
        ("billing_credit_balance", Value::Null),
        (
            "usage_dashboard_url",
            json!("https://platform.openai.com/account/usage"),
        ),
        (
            "billing_dashboard_url",
            json!("https://platform.openai.com/account/billing"),
        ),
        (
            "note",
            json!(
                "For full account usage and billing credit balance, visit the OpenAI Billing Dashboard"
            ),
        ),
        ("by_model", json!({})),
    ] {
        assert_eq!(u[field], value, "{field}");
    }
    assert_eq!(
        u["account_info"],
        json!({"api_key_prefix": "sk-test...", "model": "gpt-3.5-turbo", "status": "active"})
    );
}

#[tokio::test]
async fn account_info_is_empty_when_not_configured() {
    let app = spawn_app_with(|c, _, _| c.openai.api_key = None).await;
    assert_eq!(usage(&app, "").await["account_info"], json!({}));
}

#[tokio::test]
async fn totals_and_costs_are_summed_per_model() {
    // A local model the price table does not know, so any model is allowed.
    let app = spawn_app_with(crate::helpers::any_model).await;
    app.openai.enqueue(Reply::text("a", 1_000_000, 0));
    app.openai.enqueue(Reply::text("b", 1_000_000, 1_000_000));
    app.openai.enqueue(Reply::text("c", 1000, 1000));
    assert_eq!(
        app.post_chat(&json!({"message": "1", "model": "gpt-4"}))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.post_chat(&json!({"message": "2", "model": "gpt-3.5-turbo"}))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.post_chat(&json!({"message": "3", "model": "local-llama"}))
            .await
            .status(),
        200
    );
    let u = usage(&app, "").await;
    assert_eq!(u["request_count"], 3);
    assert_eq!(u["total_prompt_tokens"], 2_001_000);
    assert_eq!(u["total_completion_tokens"], 1_001_000);
    assert_eq!(u["total_tokens"], 3_002_000);
    assert_eq!(u["model"], "local-llama", "the latest chat's model");
    // gpt-4: 1M prompt at $30; gpt-3.5-turbo: $0.50 + $1.50; local-llama at the fallback rate.
    assert_eq!(u["prompt_cost_usd"], 30.5005);
    assert_eq!(u["completion_cost_usd"], 1.5015);
    assert_eq!(u["estimated_cost_usd"], 32.002);
    assert_eq!(
        u["by_model"]["gpt-4"],
        json!({"prompt_tokens": 1_000_000, "completion_tokens": 0, "total_tokens": 1_000_000, "cached_tokens": 0, "request_count": 1, "cost_usd": 30.0, "priced": true})
    );
    assert_eq!(u["by_model"]["local-llama"]["priced"], false);
    assert_eq!(u["unpriced_models"], json!(["local-llama"]));
}

#[tokio::test]
async fn session_id_restricts_the_answer() {
    let app = spawn_app().await;
    app.post_chat(&json!({"message": "a", "sessionId": "s1", "model": "gpt-4o"}))
        .await;
    app.post_chat(&json!({"message": "b", "sessionId": "s2"}))
        .await;
    app.post_chat(&json!({"message": "c", "sessionId": "s1", "model": "gpt-4o"}))
        .await;
    let s1 = usage(&app, "?session_id=s1").await;
    assert_eq!(s1["request_count"], 2);
    assert_eq!(s1["total_tokens"], 36);
    assert_eq!(s1["model"], "gpt-4o");
    assert_eq!(s1["session_id"], "s1");
    assert_eq!(s1["by_model"].as_object().unwrap().len(), 1);
    assert_eq!(usage(&app, "?session_id=unknown").await["request_count"], 0);
    assert_eq!(usage(&app, "").await["request_count"], 3);
}

#[tokio::test]
async fn failed_chats_are_not_counted() {
    let app = spawn_app().await;
    app.openai.enqueue(Reply::status(400, "no"));
    app.post_chat(&json!({"message": "a"})).await;
    assert_eq!(usage(&app, "").await["request_count"], 0);
}

#[tokio::test]
async fn a_hundred_concurrent_chats_give_exact_totals() {
    let app = spawn_app().await;
    let chats = (0..100).map(|i| {
        app.post_chat(
            &json!({"message": "hi", "model": if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" }}),
        )
    });
    let responses = futures_util::future::join_all(chats).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    let u = usage(&app, "").await;
    assert_eq!(u["request_count"], 100);
    assert_eq!(u["total_prompt_tokens"], 1100);
    assert_eq!(u["total_completion_tokens"], 700);
    assert_eq!(u["total_tokens"], 1800);
    assert_eq!(u["by_model"]["gpt-4o"]["request_count"], 50);
    assert_eq!(u["by_model"]["gpt-4o-mini"]["request_count"], 50);
}

#[tokio::test]
async fn pricing_file_replaces_the_table() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    write!(
        file,
        r#"{{"fallback": "house", "models": {{"house": {{"input": 1.0, "output": 2.0}}}}}}"#
    )
    .unwrap();
    let path = file.path().to_path_buf();
    let app = spawn_app_with(move |c, _, _| {
        c.pricing = al_chat::domain::pricing::PriceTable::load(Some(&path)).unwrap()
    })
    .await;
    app.openai.enqueue(Reply::text("x", 1_000_000, 1_000_000));
    app.post_chat(&json!({"message": "a", "model": "house"}))
        .await;
    let u = usage(&app, "").await;
    assert_eq!(u["estimated_cost_usd"], 3.0);
    assert_eq!(u["unpriced_models"], json!([]));
}

#[tokio::test]
async fn by_model_keeps_256_models_then_sums_the_rest_under_other() {
    // As with a permissive allow-list (OPENAI_ALLOWED_MODELS=*) and a lenient upstream.
    let app = spawn_app_with(crate::helpers::any_model).await;
    // $0.50 a chat at the fallback rate, so every row's cost is exact to 4 decimals.
    app.openai.set_default(Reply::text("x", 1_000_000, 0));
    // 300 client-chosen names, as a hostile client would send.
    for name in (0..300).map(|i| format!("model-{i:04}-{}", "x".repeat(100))) {
        let r = app.post_chat(&json!({"message": "m", "model": name})).await;
        assert_eq!(r.status(), 200);
    }
    // Names past 128 bytes are refused before anything is counted (issue 24).
    for name in (0..20).map(|i| format!("{i:04}{}", "y".repeat(4096))) {
        let r = app.post_chat(&json!({"message": "m", "model": name})).await;
        assert_eq!(r.status(), 400);
    }
    let r = app.get("/api/openai/usage").await;
    let text = r.text().await.unwrap();
    let u: Value = serde_json::from_str(&text).unwrap();
    let by_model = u["by_model"].as_object().unwrap();
    assert_eq!(by_model.len(), 257, "256 models and other");
    assert_eq!(by_model["other"]["request_count"], 44);
    assert_eq!(u["request_count"], 300, "totals stay exact");
    assert_eq!(u["total_tokens"], 300_000_000);
    assert_eq!(u["estimated_cost_usd"], 150.0);
    assert_eq!(by_model["other"]["cost_usd"], 22.0);
    assert!(by_model.keys().all(|m| m.len() <= 128));
    let summed: f64 = by_model
        .values()
        .map(|m| m["cost_usd"].as_f64().unwrap())
        .sum();
    assert!((summed - 150.0).abs() < 1e-6, "{summed}");
    assert!(u["unpriced_models"].as_array().unwrap().len() <= 257);
    assert!(text.len() < 128 * 1024, "{} bytes", text.len());
}

#[tokio::test]
async fn the_most_specific_price_entry_wins() {
    let app = spawn_app().await;
    // 1M prompt tokens each, so cost_usd is the input price per 1M.
    for (model, price) in [
        ("gpt-4o-mini", 0.15),
        ("gpt-4o-mini-2024-07-18", 0.15),
        ("gpt-4o-2024-05-13", 5.0),
        ("gpt-4.1-nano", 0.1),
    ] {
        app.openai.enqueue(Reply::text("x", 1_000_000, 0));
        assert_eq!(
            app.post_chat(&json!({"message": "a", "model": model}))
                .await
                .status(),
            200
        );
        let u = usage(&app, "").await;
        assert_eq!(u["by_model"][model]["cost_usd"], price, "{model}");
        assert_eq!(u["by_model"][model]["priced"], true, "{model}");
    }
    assert_eq!(usage(&app, "").await["unpriced_models"], json!([]));
}

#[tokio::test]
async fn cached_prompt_tokens_are_priced_at_the_cached_rate_whole_and_streamed() {
    let app = spawn_app().await;
    for stream in [false, true] {
        // gpt-4o: $2.50 per 1M input, $1.25 per 1M cached input.
        app.openai.enqueue(Reply::Cached {
            text: "cached answer".into(),
            prompt_tokens: 1_000_000,
            cached_tokens: 800_000,
            completion_tokens: 0,
        });
        let r = app
            .post_chat(&json!({"message": "a", "model": "gpt-4o", "stream": stream}))
            .await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    let u = usage(&app, "").await;
    let row = &u["by_model"]["gpt-4o"];
    assert_eq!(row["cached_tokens"], 1_600_000);
    // Each chat: 0.2M × 2.50 + 0.8M × 1.25 = $1.50.
    assert_eq!(row["cost_usd"], 3.0);
    assert_eq!(u["prompt_cost_usd"], 3.0);

    // Without a cached rate in the table, cached tokens cost the normal input rate.
    app.openai.enqueue(Reply::Cached {
        text: "x".into(),
        prompt_tokens: 1_000_000,
        cached_tokens: 800_000,
        completion_tokens: 0,
    });
    app.post_chat(&json!({"message": "a", "model": "gpt-4o-2024-05-13"}))
        .await;
    assert_eq!(
        usage(&app, "").await["by_model"]["gpt-4o-2024-05-13"]["cost_usd"],
        5.0
    );
}
