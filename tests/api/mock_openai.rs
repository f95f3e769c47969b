//! A small OpenAI-compatible server on loopback: `POST /v1/chat/completions`, whole or streamed,
//! with scripted faults. It records what it was sent and notices when a caller goes away.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

/// What the mock does with the next request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A normal answer: whole, or as deltas (one per word) when the request streams.
    Text {
        text: String,
        prompt_tokens: u64,
        completion_tokens: u64,
        delay: Duration,
    },
    /// A normal answer whose usage reports `cached` of the prompt tokens as served from
    /// OpenAI's prompt cache (`prompt_tokens_details.cached_tokens`), whole or streamed.
    Cached {
        text: String,
        prompt_tokens: u64,
        cached_tokens: u64,
        completion_tokens: u64,
    },
    /// Any status with a body and headers.
    Status {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// Accepts the request and never answers.
    Hang,
    /// Closes the connection without an answer (a reset before the response head).
    Reset,
    /// Waits, then answers as the inner reply (a slow response head, whatever follows).
    Delayed(Duration, Box<Reply>),
    /// 200 with a body that is not a chat completion.
    Malformed,
    /// A stream with full control over its shape.
    Stream(StreamScript),
    /// A whole (non-streamed) answer sent in ten pieces, `gap` apart; `cut` breaks the
    /// connection halfway.
    Trickle { gap: Duration, cut: bool },
    /// As OpenAI behaves: the prompt counted with the model's encoding (tiktoken) and OpenAI's
    /// per-message overheads, an answer of up to `answer_tokens` tokens ("tok tok ...": one each) stopped at
    /// the request's `max_completion_tokens` / `max_tokens` with `finish_reason: "length"`, and
    /// a prompt past `context_window` (with the cap) refused with `context_length_exceeded`.
    /// Whole or streamed; `usage: false` reports none (some OpenAI-compatible servers).
    Counted(Counted),
}

#[derive(Debug, Clone, Copy)]
pub struct Counted {
    pub answer_tokens: u64,
    pub context_window: Option<u64>,
    pub usage: bool,
    /// Before the answer.
    pub delay: Duration,
}

impl Counted {
    pub fn long(answer_tokens: u64) -> Self {
        Self {
            answer_tokens,
            context_window: None,
            usage: true,
            delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct StreamScript {
    pub deltas: Vec<String>,
    pub usage: Option<(u64, u64)>,
    /// Prompt tokens reported as cached in the usage chunk.
    pub cached_tokens: u64,
    /// Wait before the response head.
    pub head_delay: Duration,
    /// Wait before each chunk.
    pub gap: Duration,
    /// Break the connection after this many deltas.
    pub cut_after: Option<usize>,
    /// Send a chunk that is not JSON after the deltas.
    pub malformed_chunk: bool,
    /// Stop sending (but keep the connection open) after the deltas.
    pub stall: bool,
}

impl Reply {
    pub fn text(text: &str, prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self::Text {
            text: text.into(),
            prompt_tokens,
            completion_tokens,
            delay: Duration::ZERO,
        }
    }

    pub fn slow(text: &str, delay: Duration) -> Self {
        Self::Text {
            text: text.into(),
            prompt_tokens: 3,
            completion_tokens: 2,
            delay,
        }
    }

    pub fn status(status: u16, message: &str) -> Self {
        let body =
            json!({"error": {"message": message, "type": "test_error", "code": null}}).to_string();
        Self::Status {
            status,
            body,
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Self::Status { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub authorization: String,
    /// Azure's key header.
    pub api_key: String,
    /// The path and query the request came to.
    pub uri: String,
    pub body: Value,
    /// The HTTP version the request came in (the mock serves HTTP/1.1 and h2c).
    pub version: axum::http::Version,
}

struct MockState {
    /// Tokens this mock billed: every prompt it processed plus every answer token it produced.
    billed: std::sync::atomic::AtomicU64,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    /// When set, only these keys are accepted (others get 401).
    valid_keys: Mutex<Option<Vec<String>>>,
    requests: Mutex<Vec<Recorded>>,
    /// Requests whose caller went away before the answer was complete.
    abandoned: AtomicUsize,
    completed: AtomicUsize,
}

#[derive(Clone)]
pub struct MockOpenAi {
    pub addr: SocketAddr,
    state: Arc<MockState>,
}

impl MockOpenAi {
    pub async fn start() -> Self {
        let state = Arc::new(MockState {
            script: Mutex::default(),
            default: Mutex::new(Reply::text("Hello from the mock", 11, 7)),
            valid_keys: Mutex::default(),
            requests: Mutex::default(),
            abandoned: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            billed: Default::default(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            // Azure OpenAI's shape: the deployment in the path, `api-version` in the query.
            .route(
                "/openai/deployments/{deployment}/chat/completions",
                post(chat),
            )
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    /// The `OPENAI_BASE_URL` pointing here.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Replies for the next requests, in order; after them the default.
    pub fn enqueue(&self, reply: Reply) {
        self.state.script.lock().unwrap().push_back(reply);
    }

    pub fn set_default(&self, reply: Reply) {
        *self.state.default.lock().unwrap() = reply;
    }

    pub fn accept_only_keys(&self, keys: &[&str]) {
        *self.state.valid_keys.lock().unwrap() = Some(keys.iter().map(|k| k.to_string()).collect());
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Tokens billed by `Reply::Counted` answers: prompts processed plus answer tokens produced.
    pub fn billed(&self) -> u64 {
        self.state.billed.load(Ordering::SeqCst)
    }

    pub fn abandoned(&self) -> usize {
        self.state.abandoned.load(Ordering::SeqCst)
    }

    pub fn completed(&self) -> usize {
        self.state.completed.load(Ordering::SeqCst)
    }
}

/// Counts the request as abandoned if dropped before `finish`.
struct Watch {
    state: Arc<MockState>,
    finished: bool,
}

impl Watch {
    fn finish(mut self) {
        self.finished = true;
        self.state.completed.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.finished {
            self.state.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn chat(
    State(state): State<Arc<MockState>>,
    version: axum::http::Version,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (authorization, api_key) = (header("authorization"), header("api-key"));
    state.requests.lock().unwrap().push(Recorded {
        authorization: authorization.clone(),
        api_key: api_key.clone(),
        uri: uri.to_string(),
        body: body.clone(),
        version,
    });
    if let Some(keys) = state.valid_keys.lock().unwrap().as_ref() {
        let key = authorization
            .strip_prefix("Bearer ")
            .unwrap_or(api_key.as_str());
        if !keys.iter().any(|k| k == key) {
            let error = json!({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "code": "invalid_api_key"}});
            return (StatusCode::UNAUTHORIZED, Json(error)).into_response();
        }
    }
    let reply = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| state.default.lock().unwrap().clone());
    let model = body["model"]
        .as_str()
        .unwrap_or("gpt-3.5-turbo")
        .to_string();
    let streaming = body["stream"] == true;
    let reply = match reply {
        Reply::Delayed(delay, inner) => {
            tokio::time::sleep(delay).await;
            *inner
        }
        other => other,
    };
    let watch = Watch {
        state: state.clone(),
        finished: false,
    };
    match reply {
        Reply::Text {
            text,
            prompt_tokens,
            completion_tokens,
            delay,
        } if streaming => {
            let deltas = text.split_inclusive(' ').map(str::to_string).collect();
            let script = StreamScript {
                deltas,
                usage: Some((prompt_tokens, completion_tokens)),
                head_delay: delay,
                ..Default::default()
            };
            stream_reply(script, model, watch).await
        }
        Reply::Text {
            text,
            prompt_tokens,
            completion_tokens,
            delay,
        } => {
            tokio::time::sleep(delay).await;
            watch.finish();
            Json(completion(&model, &text, prompt_tokens, completion_tokens)).into_response()
        }
        Reply::Cached {
            text,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
        } if streaming => {
            let script = StreamScript {
                deltas: text.split_inclusive(' ').map(str::to_string).collect(),
                usage: Some((prompt_tokens, completion_tokens)),
                cached_tokens,
                ..Default::default()
            };
            stream_reply(script, model, watch).await
        }
        Reply::Cached {
            text,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
        } => {
            watch.finish();
            let mut body = completion(&model, &text, prompt_tokens, completion_tokens);
            body["usage"]["prompt_tokens_details"] = json!({"cached_tokens": cached_tokens});
            Json(body).into_response()
        }
        Reply::Status {
            status,
            body,
            headers,
        } => {
            let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            for (name, value) in headers {
                response.headers_mut().insert(
                    axum::http::HeaderName::try_from(name).unwrap(),
                    value.parse().unwrap(),
                );
            }
            watch.finish();
            response
        }
        Reply::Reset => {
            // Panicking ends the connection's task: hyper closes the socket with no response.
            std::panic::resume_unwind(Box::new("the mock resets the connection"));
        }
        Reply::Hang => {
            let _watch = watch;
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Malformed => {
            watch.finish();
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                "{\"this is\": not a completion",
            )
                .into_response()
        }
        Reply::Stream(script) => stream_reply(script, model, watch).await,
        Reply::Counted(counted) => {
            counted_reply(&state, counted, &body, model, streaming, watch).await
        }
        Reply::Delayed(..) => unreachable!("unwrapped above"),
        Reply::Trickle { gap, cut } => {
            let bytes = completion(&model, "trickled", 3, 2)
                .to_string()
                .into_bytes();
            let pieces: Vec<Vec<u8>> = bytes
                .chunks(bytes.len().div_ceil(10))
                .map(<[u8]>::to_vec)
                .collect();
            let body = async_stream::stream! {
                let watch = watch;
                for (i, piece) in pieces.into_iter().enumerate() {
                    if cut && i == 5 {
                        yield Err(std::io::Error::other("connection cut by the mock"));
                        return;
                    }
                    tokio::time::sleep(gap).await;
                    yield Ok::<_, std::io::Error>(Bytes::from(piece));
                }
                watch.finish();
            };
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(body))
                .unwrap()
        }
    }
}

fn completion(model: &str, text: &str, prompt: u64, completion: u64) -> Value {
    json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000u32, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    })
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> Bytes {
    let data = json!({
        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000u32, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null
    });
    Bytes::from(format!("data: {data}\n\n"))
}

async fn stream_reply(script: StreamScript, model: String, watch: Watch) -> Response {
    tokio::time::sleep(script.head_delay).await;
    let body = async_stream::stream! {
        let watch = watch;
        yield Ok::<_, std::io::Error>(chunk(&model, json!({"role": "assistant", "content": ""}), None));
        for (i, delta) in script.deltas.iter().enumerate() {
            if script.cut_after == Some(i) {
                yield Err(std::io::Error::other("connection cut by the mock"));
                return;
            }
            tokio::time::sleep(script.gap).await;
            yield Ok(chunk(&model, json!({"content": delta}), None));
        }
        if script.cut_after.is_some_and(|n| n >= script.deltas.len()) {
            yield Err(std::io::Error::other("connection cut by the mock"));
            return;
        }
        if script.stall {
            std::future::pending::<()>().await;
        }
        if script.malformed_chunk {
            yield Ok(Bytes::from_static(b"data: {not json at all\n\n"));
        }
        tokio::time::sleep(script.gap).await;
        yield Ok(chunk(&model, json!({}), Some("stop")));
        if let Some((p, c)) = script.usage {
            let mut usage = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
            if script.cached_tokens > 0 {
                usage["prompt_tokens_details"] = json!({"cached_tokens": script.cached_tokens});
            }
            yield Ok(usage_chunk(&model, usage));
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
        watch.finish();
    };
    event_stream(body)
}

/// The last chunk of a stream that reports usage: no choices, the usage.
fn usage_chunk(model: &str, usage: Value) -> Bytes {
    let data = json!({
        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000u32, "model": model,
        "choices": [], "usage": usage
    });
    Bytes::from(format!("data: {data}\n\n"))
}

/// A `text/event-stream` answer of `body`'s chunks.
fn event_stream(
    body: impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Response {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .unwrap()
}

/// The prompt's tokens as OpenAI counts them: 3 to prime the reply, then per message 4 plus its
/// content in the model's encoding.
pub fn openai_prompt_tokens(model: &str, body: &Value) -> u64 {
    use al_chat::domain::tokens::{PER_MESSAGE, PER_REPLY, Tokenizer};
    let tokenizer = Tokenizer::for_model(model);
    PER_REPLY
        + body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| PER_MESSAGE + tokenizer.count(m["content"].as_str().unwrap_or("")))
            .sum::<u64>()
}

async fn counted_reply(
    state: &MockState,
    counted: Counted,
    body: &Value,
    model: String,
    streaming: bool,
    watch: Watch,
) -> Response {
    tokio::time::sleep(counted.delay).await;
    let prompt = openai_prompt_tokens(&model, body);
    let cap = body["max_completion_tokens"]
        .as_u64()
        .or(body["max_tokens"].as_u64());
    if let Some(window) = counted.context_window {
        if prompt + cap.unwrap_or(0) > window {
            watch.finish();
            let message = format!(
                "This model's maximum context length is {window} tokens. However, you requested {} tokens ({prompt} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
                prompt + cap.unwrap_or(0),
                cap.unwrap_or(0)
            );
            let error = json!({"error": {"message": message, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}});
            return (StatusCode::BAD_REQUEST, Json(error)).into_response();
        }
    }
    let answer = cap.map_or(counted.answer_tokens, |c| counted.answer_tokens.min(c));
    let finish = if answer < counted.answer_tokens {
        "length"
    } else {
        "stop"
    };
    state.billed.fetch_add(prompt + answer, Ordering::SeqCst);
    let usage = counted.usage.then(|| {
        json!({"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer})
    });
    if !streaming {
        watch.finish();
        let text: String = (0..answer)
            .map(|i| if i == 0 { "tok" } else { " tok" })
            .collect();
        let mut whole = completion(&model, &text, prompt, answer);
        whole["choices"][0]["finish_reason"] = json!(finish);
        whole["usage"] = usage.unwrap_or(Value::Null);
        return Json(whole).into_response();
    }
    let body = async_stream::stream! {
        let watch = watch;
        yield Ok::<_, std::io::Error>(chunk(&model, json!({"role": "assistant", "content": ""}), None));
        for i in 0..answer {
            let piece = if i == 0 { "tok" } else { " tok" };
            yield Ok(chunk(&model, json!({"content": piece}), None));
        }
        yield Ok(chunk(&model, json!({}), Some(finish)));
        if let Some(usage) = usage {
            yield Ok(usage_chunk(&model, usage));
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
        watch.finish();
    };
    event_stream(body)
}

/// The output cap a request carried, in whichever field.
pub fn sent_cap(body: &Value) -> Option<u64> {
    body["max_completion_tokens"]
        .as_u64()
        .or(body["max_tokens"].as_u64())
}
