//! The OpenAPI document describes exactly the routes the router serves, and holds together.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::spawn_app;

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

/// The running app's own word: every operation of the document it serves answers (none is
/// documented that the router does not serve), and every request is counted under its matched
/// route, so every documented path is a metrics label and nothing falls under `other`. (Routes
/// are registered once, from the handlers' `#[utoipa::path]`; no test reads the sources.)
#[tokio::test]
async fn the_document_lists_exactly_the_served_routes_and_holds_together() {
    let app = spawn_app().await;
    let r = app.get("/api/openapi.json").await;
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(documented(&doc).len() >= 16, "{:?}", documented(&doc));
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
    // A request no route matches is `unmatched`; an unknown method on a known path is its route.
    assert_eq!(app.get("/no/such/route").await.status(), 404);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    for (method, path) in documented(&doc) {
        assert!(
            metrics.contains(&format!("method=\"{method}\",route=\"{path}\""))
                || metrics.contains(&format!("route=\"{path}\",method=\"{method}\"")),
            "{method} {path} is not a route label:\n{metrics}"
        );
    }
    assert!(metrics.contains("route=\"unmatched\""));
    assert!(!metrics.contains("route=\"other\""), "{metrics}");
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
