//! The OpenAPI document describes exactly the routes the router serves, and holds together.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::spawn_app;

/// `(METHOD, path)` of every `.route(...)` in the HTTP sources, plus what the docs page serves.
fn served_routes() -> BTreeSet<(String, String)> {
    let sources = [
        include_str!("../../src/http/health.rs"),
        include_str!("../../src/http/chat.rs"),
        include_str!("../../src/http/session.rs"),
        include_str!("../../src/http/openai.rs"),
        include_str!("../../src/http/observe.rs"),
        include_str!("../../src/http/models.rs"),
        include_str!("../../src/http/dashboard.rs"),
        include_str!("../../src/http/pages.rs"),
    ];
    let mut routes = BTreeSet::new();
    for source in sources {
        for (i, _) in source.match_indices(".route(\"") {
            let rest = &source[i + ".route(\"".len()..];
            let path = &rest[..rest.find('"').unwrap()];
            let after = &rest[path.len()..rest.find(')').unwrap() + 1];
            let method = if after.contains("post(") {
                "POST"
            } else {
                "GET"
            };
            routes.insert((method.to_string(), path.to_string()));
        }
    }
    routes.insert(("GET".into(), "/api/openapi.json".into()));
    routes.insert(("GET".into(), "/docs".into()));
    routes
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

/// Every `$ref` in `value` names a schema in the document.
fn refs_resolve(value: &Value, doc: &Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                let name = r
                    .strip_prefix("#/components/schemas/")
                    .expect("a schema ref");
                assert!(
                    doc["components"]["schemas"].get(name).is_some(),
                    "dangling $ref {r}"
                );
            }
            map.values().for_each(|v| refs_resolve(v, doc));
        }
        Value::Array(items) => items.iter().for_each(|v| refs_resolve(v, doc)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_lists_exactly_the_served_routes_and_holds_together() {
    let app = spawn_app().await;
    let r = app.get("/api/openapi.json").await;
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(documented(&doc), served_routes());
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} documents no response"
            );
        }
    }
    refs_resolve(&doc, &doc);
    // Every documented route answers (none is documented that the router does not serve).
    for (method, path) in documented(&doc) {
        // A path parameter gets a value that exists.
        let path = path.replace("{file}", "pages.css");
        let url = format!("{}{path}", app.url);
        let request = match method.as_str() {
            "GET" => app.client.get(url),
            _ => app.client.post(url).json(&serde_json::json!({})),
        };
        let status = request.send().await.unwrap().status().as_u16();
        assert!(status != 404 && status != 405, "{method} {path}: {status}");
    }
}

#[tokio::test]
async fn the_docs_page_is_served_from_inside_the_binary() {
    let app = spawn_app().await;
    let r = app.get("/docs/").await;
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("cdn") && !html.contains("unpkg"),
        "no CDN: it must work offline"
    );
    let init = app.get("/docs/swagger-initializer.js").await;
    assert_eq!(init.status(), 200);
    assert!(init.text().await.unwrap().contains("/api/openapi.json"));
}
