//! The dashboard, the playground, the docs page and cross-origin calls, in a real browser:
//! headless Chromium (the Debian package) driven by tests/node/pages-driver.mjs through
//! playwright-core, against the real service and the mock upstream. `scripts/test` installs
//! both; without them these tests fail saying so (never skipped). Screenshots go to
//! `target/browser/`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually, spawn_app, spawn_app_with};
use crate::mock_openai::{Reply, StreamScript};

const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);

fn shots_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// playwright-core's folder and the Chromium binary: from `scripts/test`'s variables, else where
/// `scripts/test` puts them.
fn browser_parts() -> (PathBuf, PathBuf) {
    const HOW: &str = "run scripts/test, which installs them (Debian package chromium; \
                       npm playwright-core into target/browser-tools)";
    let playwright = std::env::var_os("PLAYWRIGHT_CORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/browser-tools/node_modules/playwright-core")
        });
    assert!(
        playwright.join("index.mjs").exists(),
        "playwright-core not found at {}: {HOW}",
        playwright.display()
    );
    let chromium = std::env::var_os("CHROMIUM_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| panic!("Chromium not found: {HOW}"));
    (playwright, chromium)
}

/// Runs one scenario of the driver and returns what the page showed.
async fn browse(scenario: &str, base_url: &str, arg: Option<&str>) -> Value {
    let (playwright, chromium) = browser_parts();
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/pages-driver.mjs");
    let mut command = Command::new("node");
    command
        .args([driver, scenario, base_url])
        .arg(shots_dir())
        .args(arg)
        .env("PLAYWRIGHT_CORE", playwright)
        .env("CHROMIUM_BIN", chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let scenario = scenario.to_string();
    // Blocking, off the runtime's threads: the app under test keeps serving meanwhile.
    let out = tokio::task::spawn_blocking(move || {
        let mut child = command
            .spawn()
            .expect("node is needed (Debian: apt-get install nodejs); run scripts/test");
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the browser scenario {scenario} did not finish in {BROWSER_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the browser driver failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "driver output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    // A Content-Security-Policy violation or a script error shows up here.
    assert_eq!(seen["consoleErrors"], json!([]), "the page logged errors");
    let failed = seen["failedLoads"].as_array().unwrap();
    assert!(
        failed
            .iter()
            .all(|f| !f.as_str().unwrap().starts_with("404")),
        "the page asked for something the service does not serve: {failed:?}"
    );
    seen
}

async fn chat(app: &TestApp, body: Value) {
    let r = app.post_chat(&body).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn the_docs_page_lists_every_route_in_a_browser() {
    let app = spawn_app().await;
    let doc: Value = app.get("/api/openapi.json").await.json().await.unwrap();
    let seen = browse("docs", &app.url, None).await;
    let listed: Vec<&str> = seen["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let op = format!("{} {path}", method.to_uppercase());
            assert!(
                listed.contains(&op.as_str()),
                "{op} not on /docs: {listed:?}"
            );
        }
    }
}

/// With a fallback, the health card shows each upstream's breaker: here the primary's is open.
#[tokio::test]
async fn the_dashboard_shows_the_upstreams_breakers() {
    let fallback = crate::mock_openai::MockOpenAi::start().await;
    let base = fallback.base_url();
    let app = spawn_app_with(|c, openai, _| {
        openai.set_default(Reply::status(500, "down"));
        c.openai.max_retries = 0;
        c.openai.fallbacks = vec![al_chat::config::FallbackSettings {
            name: "second".into(),
            base_url: base,
            api_key: None,
            kind: al_chat::config::ApiKind::OpenAi,
            api_version: None,
            model_map: Default::default(),
        }];
        c.openai.breaker.failures = 1;
    })
    .await;
    let answered = app.post_json("/api/chat", &json!({"message": "hi"})).await;
    assert_eq!(answered.status(), 200, "the fallback answered");
    let seen = browse("dashboard", &app.url, None).await;
    let health = seen["health"].as_str().unwrap();
    assert!(
        health.contains("upstream primary") && health.contains("open"),
        "{health}"
    );
    assert!(
        health.contains("upstream second") && health.contains("closed"),
        "{health}"
    );
}

#[tokio::test]
async fn the_dashboard_draws_the_figures_of_the_usage_endpoint() {
    let app = spawn_app_with(|c, _, _| {
        c.guardrails.admin_token = Some("dash-token".into());
        c.guardrails.budget.daily_usd = Some(5.0);
        c.guardrails.budget.quota.user = Some(10_000);
    })
    .await;
    app.openai.enqueue(Reply::text("one", 1000, 400));
    app.openai.enqueue(Reply::text("two", 2000, 100));
    app.openai.enqueue(Reply::text("three", 300, 50));
    let id = app.start_session_id().await;
    chat(
        &app,
        json!({"message": "a", "model": "gpt-4o-mini", "sessionId": id, "username": "ana", "isGuest": false}),
    )
    .await;
    chat(
        &app,
        json!({"message": "b", "model": "gpt-4o-mini", "username": "ana", "isGuest": false}),
    )
    .await;
    chat(&app, json!({"message": "c", "sessionId": id})).await;
    let stopped = app
        .post_json("/api/session/stop", &json!({"session_id": id}))
        .await;
    assert_eq!(stopped.status(), 200);
    let usage: Value = app.get("/api/openai/usage").await.json().await.unwrap();

    let seen = browse("dashboard", &app.url, Some("dash-token")).await;
    assert_eq!(
        seen["askedForToken"], true,
        "the page asked for ADMIN_TOKEN"
    );
    assert_eq!(seen["tokenStored"], true, "kept in the tab");
    // The chart: one cost bar and one tokens bar per model, with the usage endpoint's figures.
    let by_model = usage["by_model"].as_object().unwrap();
    assert_eq!(by_model.len(), 2);
    let bars = seen["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 4);
    for (model, figures) in by_model {
        let bar = |metric: &str| {
            bars.iter()
                .find(|b| b["model"] == model.as_str() && b["metric"] == metric)
                .unwrap_or_else(|| panic!("no {metric} bar for {model}: {bars:?}"))
                .clone()
        };
        assert_eq!(bar("cost")["value"].as_f64(), figures["cost_usd"].as_f64());
        assert_eq!(bar("tokens")["value"], figures["total_tokens"]);
        assert!(bar("cost")["width"].as_f64().unwrap() >= 1.0);
    }
    // The larger cost draws the longer bar.
    let width = |model: &str| {
        bars.iter()
            .find(|b| b["model"] == model && b["metric"] == "cost")
            .unwrap()["width"]
            .as_f64()
            .unwrap()
    };
    let (big, small) = if by_model["gpt-4o-mini"]["cost_usd"].as_f64()
        > by_model["gpt-3.5-turbo"]["cost_usd"].as_f64()
    {
        ("gpt-4o-mini", "gpt-3.5-turbo")
    } else {
        ("gpt-3.5-turbo", "gpt-4o-mini")
    };
    assert!(width(big) > width(small));
    assert_eq!(seen["totals"]["requests"], "3");
    assert_eq!(seen["totals"]["tokens"], "3,850");
    assert_eq!(
        seen["totals"]["cost"],
        format!("${:.4}", usage["estimated_cost_usd"].as_f64().unwrap())
    );
    assert!(
        seen["totals"]["budget"]
            .as_str()
            .unwrap()
            .starts_with("$4.9"),
        "{}",
        seen["totals"]["budget"]
    );
    // Chats per minute: 60 bars summing to the three chats.
    let minutes = seen["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    assert_eq!(minutes.iter().map(|m| m.as_u64().unwrap()).sum::<u64>(), 3);
    // The session, with its duration.
    let row = seen["sessions"][0].as_array().unwrap();
    assert_eq!(row[0], id.as_str());
    assert!(row[3].as_str().unwrap().ends_with(" s"), "{row:?}");
    assert!(seen["health"].as_str().unwrap().contains("Papita"));
    // Today's top consumers: ana (two chats, 3,500 tokens) before the guest at 127.0.0.1.
    let board = app.get_json("/api/dashboard", Some("dash-token")).await;
    let consumers = seen["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 2, "{consumers:?}");
    assert_eq!(
        consumers[0],
        json!([
            "ana",
            "3,500",
            "2",
            format!(
                "${:.4}",
                board["consumers"][0]["cost_usd"].as_f64().unwrap()
            ),
            "6,500"
        ])
    );
    assert_eq!(consumers[1][0], "guest 127.0.0.*");
    assert_eq!(consumers[1][1], "350");
    assert_eq!(consumers[1][4], "no quota");
    assert_eq!(
        seen["refreshedInPlace"], true,
        "refreshed without reloading"
    );
    assert!(
        seen["phoneOverflowPx"].as_i64().unwrap() <= 0,
        "no sideways scrolling on a phone"
    );
}

fn story(gap_ms: u64, pieces: usize) -> StreamScript {
    StreamScript {
        deltas: ["Once", " upon", " a", " time", ","]
            .iter()
            .cycle()
            .take(pieces)
            .map(|s| s.to_string())
            .collect(),
        usage: Some((12, 5)),
        gap: Duration::from_millis(gap_ms),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_playground_shows_a_streamed_reply_growing_with_its_cost() {
    let app = spawn_app().await;
    app.openai.enqueue(Reply::Stream(story(150, 5)));
    let models: Value = app.get("/api/models").await.json().await.unwrap();
    let seen = browse("playground", &app.url, Some("gpt-4o-mini")).await;

    let offered: Vec<&str> = seen["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let allowed: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(offered, allowed, "the picker offers the allowed models");
    let states: Vec<&str> = seen["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(*states.last().unwrap(), "Once upon a time,");
    let between = states
        .iter()
        .filter(|s| !s.is_empty() && **s != "Once upon a time,")
        .count();
    assert!(
        between >= 2,
        "at least two partial replies seen: {states:?}"
    );
    let usage = seen["usage"].as_str().unwrap();
    assert!(
        usage.starts_with("gpt-4o-mini · 12 prompt + 5 completion tokens · $"),
        "{usage}"
    );
    assert_eq!(app.openai.requests()[0].body["model"], "gpt-4o-mini");
}

#[tokio::test]
async fn the_playground_stop_button_cancels_the_upstream_call() {
    let app = spawn_app().await;
    app.openai.enqueue(Reply::Stream(story(300, 200)));
    let seen = browse("playground-stop", &app.url, None).await;
    assert_eq!(seen["stopEnabled"], true);
    assert_eq!(seen["sendEnabledAfter"], true);
    assert!(!seen["text"].as_str().unwrap().is_empty());
    eventually("the mock sees the connection closed", || {
        app.openai.abandoned() == 1
    })
    .await;
}

#[tokio::test]
async fn the_playground_shows_the_sentence_the_api_gives() {
    let app = spawn_app_with(|c, _, papita| {
        c.openai.api_key = None;
        papita.set_credentials(crate::mock_papita::Credentials::Status(404));
    })
    .await;
    let seen = browse("playground-error", &app.url, None).await;
    let r = app.post_chat(&json!({"message": "Hello"})).await;
    let expected: Value = r.json().await.unwrap();
    assert_eq!(seen["error"], expected["error"]);
    assert!(seen["error"].as_str().unwrap().contains("OPENAI_API_KEY"));
}

#[tokio::test]
async fn a_page_from_another_origin_starts_a_session_and_chats() {
    let app = spawn_app().await;
    app.openai.enqueue(Reply::text("Hi, site!", 5, 3));
    let seen = browse("cors", &app.url, None).await;
    assert_eq!(seen["error"], Value::Null, "{seen}");
    assert_ne!(
        seen["pageOrigin"].as_str().unwrap(),
        app.url,
        "the page is on another origin"
    );
    assert_eq!(seen["startStatus"], 200);
    assert!(seen["sessionId"].as_str().unwrap().starts_with("session_"));
    assert_eq!(seen["chatStatus"], 200);
    assert_eq!(seen["message"], "Hi, site!");
    assert!(
        seen["requestId"].is_string(),
        "X-Request-ID is exposed to the page"
    );
    // JSON bodies and X-Session-ID make both calls preflighted.
    let preflights: Vec<&str> = seen["preflights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for path in ["/api/session/start", "/api/chat"] {
        assert!(
            preflights.contains(&format!("{}{path}", app.url).as_str()),
            "{path} preflighted: {preflights:?}"
        );
    }
    assert_eq!(app.openai.request_count(), 1);
}

/// A site token for the identity scenarios: HS256 with `SITE_SECRET`, for `sub`, valid 5 min.
fn site_token(sub: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 300}),
        &jsonwebtoken::EncodingKey::from_secret(SITE_SECRET.as_bytes()),
    )
    .unwrap()
}

const SITE_SECRET: &str = "a-secret-of-at-least-thirty-two-bytes-for-pages";

fn with_site_identity(c: &mut al_chat::Config) {
    c.guardrails.jwt = Some(al_chat::config::JwtKey::Secret(SITE_SECRET.into()));
}

/// With identity on, the site's page on another origin sends its token with every call, as
/// `Docs/SECURITY.md` shows: the preflight lets `Authorization` through and the chat is the
/// token's user's.
#[tokio::test]
async fn a_page_from_another_origin_sends_the_site_token() {
    let app = spawn_app_with(|c, _, _| with_site_identity(c)).await;
    app.openai.enqueue(Reply::text("Hi, ana!", 5, 3));
    let token = site_token("ana");
    let seen = browse("cors", &app.url, Some(&token)).await;
    assert_eq!(seen["error"], Value::Null, "{seen}");
    assert_eq!(seen["startStatus"], 200, "{seen}");
    assert_eq!(seen["chatStatus"], 200, "{seen}");
    assert_eq!(seen["message"], "Hi, ana!");
    crate::helpers::eventually("the Papita record", || app.papita.records().len() == 1).await;
    assert_eq!(app.papita.records()[0]["username"], "ana");
    // Without the token the same page is refused.
    let refused = browse("cors", &app.url, None).await;
    assert_eq!(refused["startStatus"], 401, "{refused}");
}

/// The playground asks for the site token after a 401 and chats with it.
#[tokio::test]
async fn the_playground_asks_for_the_site_token_when_identity_is_on() {
    let app = spawn_app_with(|c, openai, _| {
        with_site_identity(c);
        openai.set_default(Reply::text("Hello, operator", 5, 3));
    })
    .await;
    let token = site_token("operator");
    let seen = browse("playground-token", &app.url, Some(&token)).await;
    assert_eq!(seen["askedBefore"], false, "{seen}");
    assert!(
        seen["error"]
            .as_str()
            .unwrap()
            .starts_with("Sign-in required"),
        "{seen}"
    );
    assert_eq!(seen["asked"], true, "{seen}");
    assert_eq!(seen["reply"], "Hello, operator", "{seen}");
    assert_eq!(seen["errorHidden"], true, "{seen}");
    assert_eq!(seen["tokenKept"], true, "{seen}");
    assert_eq!(seen["consoleErrors"], json!([]), "{seen}");
}
