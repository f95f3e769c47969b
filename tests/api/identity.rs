//! Optional verified identity (issue 28): with `AUTH_JWT_SECRET` or `AUTH_JWT_PUBLIC_KEY` set,
//! chats and sessions need the site's token, and its `sub`/`guest` replace the body's
//! `username`/`isGuest` in the quotas, the session log and the record Papita receives. Tokens
//! are signed here as the site would, with `jsonwebtoken` and throwaway keys
//! (`tests/fixtures/jwt`).

use al_chat::config::{Config, JwtKey};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, error_of, eventually, spawn_app_with};
use crate::mock_openai::Reply;

const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes-for-hs256";
const RS_PRIVATE: &str = include_str!("../fixtures/jwt/rs256_private.pem");
const RS_PUBLIC: &str = include_str!("../fixtures/jwt/rs256_public.pem");
const ES_PRIVATE: &str = include_str!("../fixtures/jwt/es256_private.pem");
const ES_PUBLIC: &str = include_str!("../fixtures/jwt/es256_public.pem");

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn alice(exp_in: i64) -> Value {
    json!({"sub": "alice", "guest": false, "exp": now() + exp_in})
}

fn with_secret(c: &mut Config) {
    c.guardrails.jwt = Some(JwtKey::Secret(SECRET.into()));
}

/// A chat with `token` (if any) as the bearer; the status and the error sentence, if any.
async fn chat_with(app: &TestApp, token: Option<&str>, body: &Value) -> (u16, String) {
    let mut request = app.client.post(format!("{}/api/chat", app.url)).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    if status == 200 {
        return (status, String::new());
    }
    assert_eq!(
        response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        (status == 401).then_some("Bearer")
    );
    (status, error_of(response).await)
}

async fn hi(app: &TestApp, token: Option<&str>) -> (u16, String) {
    chat_with(app, token, &json!({"message": "hi"})).await
}

#[tokio::test]
async fn hs256_tokens_valid_expired_not_yet_valid_forged_and_malformed() {
    let app = spawn_app_with(|c, _, _| with_secret(c)).await;
    assert_eq!(hi(&app, Some(&hs256(&alice(300)))).await.0, 200);
    // Within the 60 s leeway an expired token still passes; past it, not.
    assert_eq!(hi(&app, Some(&hs256(&alice(-30)))).await.0, 200);
    let (status, error) = hi(&app, Some(&hs256(&alice(-120)))).await;
    assert_eq!(
        (status, error.as_str()),
        (401, "The sign-in token has expired. Sign in again.")
    );
    let later = json!({"sub": "alice", "exp": now() + 600, "nbf": now() + 300});
    let (status, error) = hi(&app, Some(&hs256(&later))).await;
    assert_eq!(status, 401);
    assert!(error.contains("not valid yet"), "{error}");
    // Signed with another secret.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &alice(300),
        &EncodingKey::from_secret(b"another-secret-another-secret-another!!"),
    )
    .unwrap();
    let (status, error) = hi(&app, Some(&forged)).await;
    assert_eq!(status, 401);
    assert!(error.contains("signature does not match"), "{error}");
    // Missing, not a JWT, no exp, no sub.
    let (status, error) = hi(&app, None).await;
    assert_eq!(status, 401);
    assert!(error.starts_with("Sign-in required"), "{error}");
    assert_eq!(hi(&app, Some("not.a.jwt")).await.0, 401);
    let (status, error) = hi(&app, Some(&hs256(&json!({"sub": "alice"})))).await;
    assert_eq!(status, 401);
    assert!(error.contains("no exp"), "{error}");
    let (status, error) = hi(&app, Some(&hs256(&json!({"exp": now() + 300})))).await;
    assert_eq!(status, 401);
    assert!(error.contains("names no user (sub)"), "{error}");
    // A refused identity reached nobody.
    assert_eq!(app.openai.request_count(), 2);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("alchat_guardrail_refusals_total{guardrail=\"auth_token\"} 7"),
        "{metrics}"
    );
}

/// `alg: none` (an unsigned token) and the HS/RS confusion (an HS256 token whose "secret" is the
/// service's RSA public key) are both refused: only the configured algorithm is accepted.
#[tokio::test]
async fn alg_none_and_algorithm_confusion_are_refused() {
    let app = spawn_app_with(|c, _, _| {
        c.guardrails.jwt = Some(JwtKey::PublicPem(RS_PUBLIC.into()));
    })
    .await;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&alice(300))
    );
    let (status, error) = hi(&app, Some(&unsigned)).await;
    assert_eq!(status, 401, "{error}");
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &alice(300),
        &EncodingKey::from_secret(RS_PUBLIC.as_bytes()),
    )
    .unwrap();
    let (status, error) = hi(&app, Some(&confused)).await;
    assert_eq!(status, 401);
    assert_eq!(
        error,
        "The sign-in token is signed with HS256; this service accepts only RS256. Sign in again."
    );
    let signed = encode(
        &Header::new(Algorithm::RS256),
        &alice(300),
        &EncodingKey::from_rsa_pem(RS_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(hi(&app, Some(&signed)).await.0, 200);
    assert_eq!(app.openai.request_count(), 1);
}

#[tokio::test]
async fn es256_public_keys_verify_es256_tokens_only() {
    let app = spawn_app_with(|c, _, _| {
        c.guardrails.jwt = Some(JwtKey::PublicPem(ES_PUBLIC.into()));
    })
    .await;
    let signed = encode(
        &Header::new(Algorithm::ES256),
        &alice(300),
        &EncodingKey::from_ec_pem(ES_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(hi(&app, Some(&signed)).await.0, 200);
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &alice(300),
        &EncodingKey::from_rsa_pem(RS_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(hi(&app, Some(&rs)).await.0, 401);
}

/// The token's `sub` wins over the body's `username`: in the session log's `chat_usage` line, in
/// the record Papita receives, and in the quota charged.
#[tokio::test]
async fn the_token_wins_over_the_body_in_the_log_the_papita_record_and_the_quota() {
    let app = spawn_app_with(|c, openai, _| {
        with_secret(c);
        c.guardrails.budget.quota.user = Some(100_000);
        openai.set_default(Reply::text("ok", 11, 7));
    })
    .await;
    let token = hs256(&alice(300));
    // Sessions need the token too.
    let refused = app
        .client
        .post(format!("{}/api/session/start", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let stop = app.stop_session(&json!({})).await;
    assert_eq!(stop.status(), 401);
    let started: Value = app
        .client
        .post(format!("{}/api/session/start", app.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = started["session_id"].as_str().unwrap().to_string();
    // The start line says who started it, as the token says.
    let date = chrono::Local::now().format("%Y-%m-%d").to_string();
    let start_line = app
        .log_lines(&date)
        .into_iter()
        .find(|l| l["event"] == "session_start" && l["session_id"] == session.as_str())
        .expect("the start line is on disk when the start answers");
    assert_eq!(start_line["username"], "alice", "{start_line}");
    assert_eq!(start_line["is_guest"], false, "{start_line}");
    let body =
        json!({"message": "hi", "username": "mallory", "isGuest": true, "sessionId": session});
    assert_eq!(chat_with(&app, Some(&token), &body).await.0, 200);

    eventually("the Papita record", || app.papita.records().len() == 1).await;
    let record = &app.papita.records()[0];
    assert_eq!(record["username"], "alice", "{record}");
    assert_eq!(record["isGuest"], false, "{record}");

    let line = app.first_chat_usage_line().await;
    assert_eq!(line["metric_value"]["username"], "alice", "{line}");
    assert_eq!(line["metric_value"]["is_guest"], false, "{line}");

    let usage = app.get_json("/api/openai/usage?username=alice", None).await;
    assert_eq!(usage["user"]["tokens"], 18);
    assert_eq!(usage["user"]["quota_left"], 100_000 - 18);
    let mallory = app
        .get_json("/api/openai/usage?username=mallory", None)
        .await;
    assert_eq!(
        mallory["user"]["requests"], 0,
        "the body's claim counted nothing"
    );
}

/// Without a key the body's fields count, unverified, and no line changes: `chat_usage` carries
/// no username, as before.
#[tokio::test]
async fn without_a_key_nothing_needs_a_token_and_the_log_is_unchanged() {
    let app = spawn_app_with(|_, openai, _| openai.set_default(Reply::text("ok", 11, 7))).await;
    let session = app.start_session_id().await;
    let body = json!({"message": "hi", "username": "ana", "isGuest": false, "sessionId": session});
    assert_eq!(chat_with(&app, None, &body).await.0, 200);
    let line = app.first_chat_usage_line().await;
    assert_eq!(
        line["metric_value"],
        json!({"model": "gpt-3.5-turbo", "prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})
    );
    // The OpenAPI document has no bearer scheme for chats.
    let doc = app.get_json("/api/openapi.json", None).await;
    assert!(doc["paths"]["/api/chat"]["post"].get("security").is_none());
}

#[tokio::test]
async fn the_openapi_document_names_the_bearer_scheme_when_identity_is_on() {
    let app = spawn_app_with(|c, _, _| with_secret(c)).await;
    let doc = app.get_json("/api/openapi.json", None).await;
    let scheme = &doc["components"]["securitySchemes"]["site_token"];
    assert_eq!(scheme["scheme"], "bearer", "{scheme}");
    assert_eq!(scheme["bearerFormat"], "JWT");
    for path in ["/api/chat", "/api/session/start", "/api/session/stop"] {
        assert_eq!(
            doc["paths"][path]["post"]["security"],
            json!([{"site_token": []}]),
            "{path}"
        );
    }
    assert!(doc["paths"]["/api/health"]["get"].get("security").is_none());
}

#[test]
fn a_key_that_cannot_verify_stops_the_start_without_showing_it() {
    let load = |pairs: &[(&str, &str)]| {
        let vars: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_sources(|_| None, &vars, std::path::PathBuf::from(".env"), false)
    };
    let short = load(&[("AUTH_JWT_SECRET", "short-secret")])
        .unwrap_err()
        .to_string();
    assert!(short.contains("at least 32 bytes"), "{short}");
    assert!(!short.contains("short-secret"), "{short}");
    let garbage = load(&[(
        "AUTH_JWT_PUBLIC_KEY",
        "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----",
    )])
    .unwrap_err()
    .to_string();
    assert!(garbage.contains("RSA or P-256"), "{garbage}");
    let both = load(&[
        ("AUTH_JWT_SECRET", SECRET),
        ("AUTH_JWT_PUBLIC_KEY", RS_PUBLIC),
    ])
    .unwrap_err()
    .to_string();
    assert!(both.contains("not both"), "{both}");
    assert!(load(&[("AUTH_JWT_PUBLIC_KEY", ES_PUBLIC)]).is_ok());
    // A path to a .pem file works as well as the text.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.pem");
    std::fs::write(&path, RS_PUBLIC).unwrap();
    let from_file = load(&[("AUTH_JWT_PUBLIC_KEY", path.to_str().unwrap())]).unwrap();
    assert!(matches!(from_file.guardrails.jwt, Some(JwtKey::PublicPem(pem)) if pem == RS_PUBLIC));
    let missing = load(&[("AUTH_JWT_PUBLIC_KEY", "/nonexistent/site.pem")])
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("neither PEM text nor a readable file"),
        "{missing}"
    );
}

/// A token with `"guest": true` makes a guest of whoever the body claims to be: charged to the
/// guest quota of its address (shared with other guests there), recorded as a guest.
#[tokio::test]
async fn a_guest_token_is_a_guest_whatever_the_body_claims() {
    let app = spawn_app_with(|c, openai, _| {
        with_secret(c);
        c.guardrails.budget.quota.guest = Some(1_000);
        c.guardrails.budget.quota.user = Some(1_000_000);
        openai.set_default(Reply::Counted(crate::mock_openai::Counted::long(2_000)));
    })
    .await;
    let guest = |sub: &str| hs256(&json!({"sub": sub, "guest": true, "exp": now() + 300}));
    let body = json!({"message": "hi", "username": "ana", "isGuest": false});
    assert_eq!(
        chat_with(&app, Some(&guest("visitor-7")), &body).await.0,
        200
    );
    let (status, error) = chat_with(&app, Some(&guest("visitor-8")), &body).await;
    assert_eq!(status, 429, "another guest at the same address: {error}");
    assert!(error.contains("(per guest)"), "{error}");

    eventually("the Papita record", || app.papita.records().len() == 1).await;
    let record = &app.papita.records()[0];
    assert_eq!(record["username"], "visitor-7", "{record}");
    assert_eq!(record["isGuest"], true, "{record}");
    let board = app.get_json("/api/dashboard", None).await;
    let consumers = board["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1, "{board}");
    assert_eq!(consumers[0]["kind"], "guest", "{board}");
    assert_eq!(consumers[0]["name"], "127.0.0.*", "{board}");
    assert_eq!(consumers[0]["quota_left"], 0, "{board}");
}
