//! `spawn_app()`: the real application on 127.0.0.1:0, its OpenAI and Papita pointed at loopback
//! mocks, its session log in a temporary folder. Tests speak real HTTP to it.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;

use al_chat::clock::{Clock, ManualClock, SystemClock};
use al_chat::state::AppState;
use al_chat::{Application, Config};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::mock_openai::MockOpenAi;
use crate::mock_papita::MockPapita;

/// The longest any single request or shutdown in a test may take before it fails.
pub const TEST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The `.env`-style fallback key every test app starts with (any key works with a custom base URL).
pub const TEST_KEY: &str = "sk-test-key-0123456789abcdefXYZ";

pub struct TestApp {
    pub url: String,
    pub client: reqwest::Client,
    pub openai: MockOpenAi,
    pub papita: MockPapita,
    pub log_dir: PathBuf,
    pub state: AppState,
    _tmp: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_, _, _| {}).await
}

/// `setup` may change the configuration and script the mocks before the app starts.
pub async fn spawn_app_with(setup: impl FnOnce(&mut Config, &MockOpenAi, &MockPapita)) -> TestApp {
    spawn_app_with_clock(Arc::new(SystemClock), setup).await
}

pub async fn spawn_app_with_clock(
    clock: Arc<dyn Clock>,
    setup: impl FnOnce(&mut Config, &MockOpenAi, &MockPapita),
) -> TestApp {
    init_logs();
    let openai = MockOpenAi::start().await;
    let papita = MockPapita::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut config = Config::defaults();
    config.host = "127.0.0.1".into();
    config.port = 0;
    config.openai.base_url = openai.base_url();
    config.openai.api_key = Some(TEST_KEY.into());
    config.openai.timeout = Duration::from_secs(5);
    config.papita.url = papita.url();
    config.log_dir = tmp.path().join("SessionLog");
    config.shutdown_grace = Duration::from_secs(5);
    setup(&mut config, &openai, &papita);
    let log_dir = config.log_dir.clone();

    let app = Application::build_with_clock(config, clock)
        .await
        .expect("app builds");
    let url = format!("http://{}", app.local_addr());
    let state = app.state().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        url,
        // Every request a test makes fails after this instead of hanging the suite.
        client: reqwest::Client::builder()
            .timeout(TEST_REQUEST_TIMEOUT)
            .build()
            .unwrap(),
        openai,
        papita,
        log_dir,
        state,
        _tmp: tmp,
        shutdown: Some(tx),
        server: Some(server),
    }
}

/// `OPENAI_ALLOWED_MODELS=*`: for tests of what happens to models the default list refuses.
pub fn any_model(
    c: &mut Config,
    _: &crate::mock_openai::MockOpenAi,
    _: &crate::mock_papita::MockPapita,
) {
    c.guardrails.allowed_models = Some("*".into());
}

/// A clock the test moves, starting at the given local time.
pub fn manual_clock(
    y: i32,
    mo: u32,
    d: u32,
    h: u32,
    mi: u32,
    s: u32,
    micros: u32,
) -> Arc<ManualClock> {
    Arc::new(ManualClock::new(local(y, mo, d, h, mi, s, micros)))
}

pub fn local(
    y: i32,
    mo: u32,
    d: u32,
    h: u32,
    mi: u32,
    s: u32,
    micros: u32,
) -> chrono::DateTime<chrono::Local> {
    use chrono::TimeZone;
    chrono::Local.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
        + chrono::Duration::microseconds(micros.into())
}

impl TestApp {
    // These build the request before returning the future, so many can be in flight at once
    // without borrowing their bodies.
    pub fn get(&self, path: &str) -> impl Future<Output = reqwest::Response> + use<> {
        let request = self.client.get(format!("{}{path}", self.url));
        async move { request.send().await.expect("request sent") }
    }

    pub fn post_json(
        &self,
        path: &str,
        body: &Value,
    ) -> impl Future<Output = reqwest::Response> + use<> {
        let request = self.client.post(format!("{}{path}", self.url)).json(body);
        async move { request.send().await.expect("request sent") }
    }

    pub fn post_chat(&self, body: &Value) -> impl Future<Output = reqwest::Response> + use<> {
        self.post_json("/api/chat", body)
    }

    /// Sends `{"message": "hi"}` to /api/chat on a task of its own (for shutdown tests).
    pub fn chat_in_background(&self) -> JoinHandle<reqwest::Result<reqwest::Response>> {
        tokio::spawn(
            self.client
                .post(format!("{}/api/chat", self.url))
                .json(&serde_json::json!({"message": "hi"}))
                .send(),
        )
    }

    pub async fn start_session(&self) -> Value {
        let response = self
            .post_json("/api/session/start", &serde_json::json!({}))
            .await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub fn stop_session(&self, body: &Value) -> impl Future<Output = reqwest::Response> + use<> {
        self.post_json("/api/session/stop", body)
    }

    /// Waits until the cached credentials say configured (they resolve in the background).
    pub async fn wait_configured(&self, expected: bool) {
        // The resolution health reports; waiting on it is waiting on the event itself.
        self.state.credentials.get().await;
        let body: Value = self.get("/api/health").await.json().await.unwrap();
        assert_eq!(body["openai_configured"], expected);
    }

    /// Starts a session and returns its id.
    pub async fn start_session_id(&self) -> String {
        self.start_session().await["session_id"]
            .as_str()
            .expect("a session id")
            .to_string()
    }

    /// The parsed lines of one day's log file (empty if there is none).
    pub fn log_lines(&self, date: &str) -> Vec<Value> {
        read_log(&self.log_dir, date)
    }

    /// The first `chat_usage` line of today's log, once it is written.
    pub async fn first_chat_usage_line(&self) -> Value {
        let date = chrono::Local::now().format("%Y-%m-%d").to_string();
        let find = || {
            self.log_lines(&date)
                .into_iter()
                .find(|l| l["metric_name"] == "chat_usage")
        };
        eventually("a chat_usage line", || find().is_some()).await;
        find().unwrap_or_default()
    }

    /// `GET path` as JSON, with `Authorization: Bearer <token>` when one is given.
    pub async fn get_json(&self, path: &str, token: Option<&str>) -> Value {
        let mut request = self.client.get(format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request sent");
        response.json().await.expect("a JSON answer")
    }

    /// Stops the app as SIGTERM would, and waits until it has exited.
    pub async fn shutdown(&mut self) {
        self.trigger_shutdown();
        self.wait_stopped().await;
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn wait_stopped(&mut self) {
        if let Some(server) = self.server.take() {
            tokio::time::timeout(TEST_REQUEST_TIMEOUT, server)
                .await
                .expect("the app stops within the grace period")
                .expect("server task")
                .expect("server exits cleanly");
        }
    }
}

pub fn read_log(dir: &Path, date: &str) -> Vec<Value> {
    match std::fs::read_to_string(dir.join(format!("session_{date}.log"))) {
        Ok(text) => text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect(),
        Err(_) => Vec::new(),
    }
}

pub use crate::ports::closed_address;

/// The `error` text of a JSON error answer.
pub async fn error_of(response: reqwest::Response) -> String {
    let body: Value = response.json().await.expect("a JSON body");
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error text: {body}"))
        .to_string()
}

/// How often the polling helpers look again; the one pause in the helpers.
const POLL: Duration = Duration::from_millis(10);

/// Polls `check` until it holds; fails after five seconds instead of hanging the suite.
pub async fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(5), check).await;
}

/// As `eventually`, with a deadline of its own (for work with backoff in it).
pub async fn eventually_within(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    let mut poll = tokio::time::interval(POLL);
    while tokio::time::Instant::now() < deadline {
        if check() {
            return;
        }
        poll.tick().await;
    }
    panic!("timed out waiting for: {what}");
}

/// A response's `Retry-After`, in seconds.
pub fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Polls the async `probe` until `done` holds of what it returned, and returns that. Fails after
/// `within` saying what it waited for and the last value it saw, instead of hanging or going on
/// with a stale value. For state that moves on its own (a replica's batch reaching Redis, records
/// reaching the mock Papita); the pause between looks is the helpers' one `POLL`.
pub async fn eventually_seeing<T, Fut>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Fut,
    mut done: impl FnMut(&T) -> bool,
) -> T
where
    T: std::fmt::Debug,
    Fut: Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut poll = tokio::time::interval(POLL);
    loop {
        let seen = probe().await;
        if done(&seen) {
            return seen;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}; last saw: {seen:?}");
        }
        poll.tick().await;
    }
}

/// Moves tokio's clock (which the credentials cache and other deadlines use) forward at once,
/// instead of sleeping past a TTL. The app runs on the test's own runtime, so it sees the jump.
pub async fn skip_time(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

/// A raw POST with the given content type and body (for malformed-input tests).
pub fn post_raw(
    app: &TestApp,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> impl Future<Output = reqwest::Response> + use<> {
    let request = app
        .client
        .post(format!("{}{path}", app.url))
        .header("content-type", content_type)
        .body(body);
    async move { request.send().await.expect("request sent") }
}

/// The local date a manual clock stands at, as log file names use it.
pub fn date_of(clock: &ManualClock) -> String {
    clock.now().format("%Y-%m-%d").to_string()
}

/// Every log line any test app wrote (debug level and up), for "the key never appears" checks.
/// Printed as well when `TEST_LOG` is set.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(Arc::default)
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = std::io::stderr().write_all(buf);
        }
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let buffer = logs().clone();
        tracing_subscriber::fmt()
            .with_env_filter("debug,hyper_util=info,hyper=info")
            .with_ansi(false)
            .with_writer(move || Capture(buffer.clone()))
            .init();
    });
}
