//! Contract §10: the file format, rotation by each line's date, durability, faults.

use serde_json::{Value, json};

use crate::helpers::{date_of, local, manual_clock, spawn_app, spawn_app_with_clock};

#[tokio::test]
async fn project_init_is_written_at_start_up() {
    let clock = manual_clock(2026, 11, 23, 7, 0, 0, 0);
    let app = spawn_app_with_clock(clock, |_, _, _| {}).await;
    crate::helpers::eventually("project_init", || !app.log_lines("2026-11-23").is_empty()).await;
    let init = &app.log_lines("2026-11-23")[0];
    let keys: Vec<&String> = init.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["event", "timestamp", "date", "project_criteria"]);
    assert_eq!(init["event"], "project_init");
    assert_eq!(init["project_criteria"]["name"], "AL-Chat");
}

#[tokio::test]
async fn lines_are_written_as_the_flask_service_wrote_them() {
    let clock = manual_clock(2026, 11, 23, 7, 0, 0, 0);
    let app = spawn_app_with_clock(clock, |_, _, _| {}).await;
    let id = app.start_session_id().await;
    app.stop_session(&json!({"session_id": id, "metrics": {"note": "café ☕", "list": [1, 2]}}))
        .await;
    let text = std::fs::read_to_string(app.log_dir.join("session_2026-11-23.log")).unwrap();
    assert!(text.contains("{\"event\": \"session_start\", \"session_id\": \"session_20261123_070000\", \"timestamp\": \"2026-11-23T07:00:00.000000\", \"date\": \"2026-11-23\"}\n"), "{text}");
    assert!(
        text.contains("\"metrics\": {\"note\": \"café ☕\", \"list\": [1, 2]}}\n"),
        "{text}"
    );
    assert!(text.ends_with('\n'));
}

#[tokio::test]
async fn lines_either_side_of_midnight_land_in_their_own_files() {
    let clock = manual_clock(2026, 11, 23, 23, 59, 59, 999_999);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    let id = app.start_session_id().await;
    clock.set(local(2026, 11, 24, 0, 0, 0, 0));
    let body: Value = app
        .stop_session(&json!({"session_id": id}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["duration_seconds"], 0.000001);
    let before: Vec<Value> = app.log_lines("2026-11-23");
    let after: Vec<Value> = app.log_lines("2026-11-24");
    assert!(
        before
            .iter()
            .any(|l| l["event"] == "session_start" && l["date"] == "2026-11-23")
    );
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["event"], "session_stop");
    assert_eq!(after[0]["date"], "2026-11-24");
    assert_eq!(after[0]["timestamp"], "2026-11-24T00:00:00.000000");
}

#[tokio::test]
async fn an_unwritable_folder_fails_start_and_stop_but_nothing_else_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, "a file where the log folder's parent should be").unwrap();
    let dir = blocker.join("SessionLog");
    let clock = manual_clock(2026, 11, 23, 9, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), move |c, _, _| c.log_dir = dir).await;

    let r = app.post_json("/api/session/start", &json!({})).await;
    assert_eq!(r.status(), 500);
    let error = crate::helpers::error_of(r).await;
    assert!(
        error.starts_with("Could not write the session log"),
        "{error}"
    );
    assert_eq!(
        app.state.sessions.tracked().await,
        0,
        "no session half-started"
    );
    let r = app
        .stop_session(&json!({"session_id": "session_20261123_070000"}))
        .await;
    assert_eq!(r.status(), 500);
    assert_eq!(app.get("/api/health").await.status(), 200, "alive");
    let ready = app.get("/api/ready").await;
    assert_eq!(ready.status(), 503, "not ready");
    let error = crate::helpers::error_of(ready).await;
    assert!(
        error.contains("not writable") && error.contains("SessionLog"),
        "{error}"
    );
    assert_eq!(
        app.post_chat(&json!({"message": "hi", "sessionId": "x"}))
            .await
            .status(),
        200
    );

    // The folder becomes writable: logging resumes without a restart.
    std::fs::remove_file(&blocker).unwrap();
    assert_eq!(app.get("/api/ready").await.status(), 200);
    let r = app.post_json("/api/session/start", &json!({})).await;
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let lines = crate::helpers::read_log(&blocker.join("SessionLog"), &date_of(&clock));
    assert!(lines.iter().any(|l| l["session_id"] == id.as_str()));
    // The start-up line that could not be written then was kept, and written first.
    assert_eq!(lines[0]["event"], "project_init", "{lines:?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["event"] == "project_init")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_full_disk_fails_start_with_a_clear_error_and_leaves_no_torn_line() {
    let clock = manual_clock(2026, 11, 23, 7, 0, 0, 0);
    let app = spawn_app_with_clock(clock.clone(), |_, _, _| {}).await;
    crate::helpers::eventually("project_init", || !app.log_lines("2026-11-23").is_empty()).await;
    // Tomorrow's file is a disk with no space left.
    std::os::unix::fs::symlink("/dev/full", app.log_dir.join("session_2026-11-24.log")).unwrap();
    clock.set(local(2026, 11, 24, 7, 0, 0, 0));
    let r = app.post_json("/api/session/start", &json!({})).await;
    assert_eq!(r.status(), 500);
    let error = crate::helpers::error_of(r).await;
    assert!(error.contains("No space left"), "{error}");
    // Space is freed (the file is a real file again): the next start succeeds.
    std::fs::remove_file(app.log_dir.join("session_2026-11-24.log")).unwrap();
    assert_eq!(
        app.post_json("/api/session/start", &json!({}))
            .await
            .status(),
        200
    );
    let lines = app.log_lines("2026-11-24");
    assert_eq!(lines.len(), 1, "only the successful start: {lines:?}");
}

#[tokio::test]
async fn the_log_folder_is_created_when_missing() {
    let app = spawn_app().await;
    assert_eq!(
        app.post_json("/api/session/start", &json!({}))
            .await
            .status(),
        200
    );
    assert!(app.log_dir.is_dir());
}

/// What this proves: the `session_start` line reached the file (the kernel) before the 200, so a
/// crash of the process right after the answer loses nothing. SIGKILL keeps the page cache, so it
/// cannot prove the fsync itself (that needs a power cut); the fsync is covered by the writer's
/// group-commit test (`queued_lines_are_committed_together_with_one_sync_per_file`), which
/// counts one `fdatasync` per file per batch before the acknowledgements.
#[test]
fn a_200_means_the_line_reached_the_file_before_a_kill() {
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let port = crate::ports::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_al-chat"))
        .env_clear()
        .current_dir(tmp.path())
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("PAPITA_API_URL", "http://127.0.0.1:9")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    crate::ports::wait_listening(port);
    let id = rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/api/session/start"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["session_id"]
            .as_str()
            .unwrap()
            .to_string()
    });
    child.kill().unwrap(); // SIGKILL: no shutdown, no flush
    child.wait().unwrap();
    let text: String = std::fs::read_dir(tmp.path().join("SessionLog"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        text.contains(&format!("\"session_id\": \"{id}\"")),
        "{text}"
    );
}
