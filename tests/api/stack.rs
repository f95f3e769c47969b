//! The deployment of `deploy/`, run for real without a container engine: nginx (the Debian
//! package, which `scripts/test` installs) with `deploy/nginx.conf`, its addresses filled in by the
//! template step documented in `Docs/DEPLOYMENT.md`, in front of two replicas of the binary on one
//! redis-server. Mock OpenAI and Papita run on loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::binary::al_chat;
use crate::helpers::eventually_seeing;
use crate::mock_openai::{MockOpenAi, Reply, StreamScript};
use crate::mock_papita::MockPapita;
use crate::ports::free_port;
use crate::redis_server::RedisServer;

fn nginx_binary() -> PathBuf {
    std::env::var_os("NGINX_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/sbin/nginx", "/usr/bin/nginx"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| {
            panic!(
                "nginx not found: run scripts/test, which installs it (Debian: apt-get install \
                 nginx), or set NGINX_BIN"
            )
        })
}

/// `deploy/nginx.conf` with the template step of `Docs/DEPLOYMENT.md` applied.
fn nginx_site(replicas: [u16; 2], listen: u16) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let conf = std::fs::read_to_string(root.join("deploy/nginx.conf")).unwrap();
    let filled = conf
        .replace("al-chat-1:5000", &format!("127.0.0.1:{}", replicas[0]))
        .replace("al-chat-2:5000", &format!("127.0.0.1:{}", replicas[1]))
        .replace("listen 80;", &format!("listen 127.0.0.1:{listen};"));
    for gone in ["al-chat-1:5000", "al-chat-2:5000", "listen 80;"] {
        assert!(
            conf.contains(gone) && !filled.contains(gone),
            "the documented template step no longer applies to deploy/nginx.conf ({gone})"
        );
    }
    filled
}

struct Replica {
    child: Option<Child>,
    port: u16,
}

/// What a client of the site needs: nginx's address.
struct Front {
    port: u16,
    client: reqwest::Client,
}

struct Stack {
    dir: tempfile::TempDir,
    _redis: RedisServer,
    replicas: [Replica; 2],
    nginx: Child,
    front: Arc<Front>,
    env: Vec<(String, String)>,
}

impl Stack {
    async fn start(openai: &MockOpenAi, papita: &MockPapita, extra: &[(&str, &str)]) -> Self {
        let redis = RedisServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut env: Vec<(String, String)> = vec![
            ("STATE_URL".into(), redis.url()),
            ("TRUSTED_PROXIES".into(), "127.0.0.1/32".into()),
            ("OPENAI_BASE_URL".into(), openai.base_url()),
            ("OPENAI_API_KEY".into(), "sk-test-stack-0123456789".into()),
            ("PAPITA_API_URL".into(), papita.url()),
            ("SHUTDOWN_GRACE_SECS".into(), "10".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let replicas = [free_port(), free_port()].map(|port| Replica { child: None, port });
        let port = free_port();
        let site = dir.path().join("al-chat.conf");
        std::fs::write(
            &site,
            nginx_site([replicas[0].port, replicas[1].port], port),
        )
        .unwrap();
        let d = dir.path().display();
        // The main configuration around the site file, everything in the test's folder. As root,
        // workers would switch to `nobody`, who cannot enter a private temporary folder.
        let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
        let user = if root { "user root;" } else { "" };
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "{user}\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
                 include {d}/al-chat.conf; }}\n"
            ),
        )
        .unwrap();
        let nginx = Command::new(nginx_binary())
            .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nginx starts");
        let mut stack = Self {
            dir,
            _redis: redis,
            replicas,
            nginx,
            front: Arc::new(Front {
                port,
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap(),
            }),
            env,
        };
        for i in 0..2 {
            stack.start_replica(i).await;
        }
        listening(port).await;
        stack
    }

    async fn start_replica(&mut self, i: usize) {
        let replica = &mut self.replicas[i];
        let log_dir = self.dir.path().join(format!("SessionLog-{i}"));
        let mut command = al_chat(self.dir.path());
        command
            .env("HOST", "127.0.0.1")
            .env("PORT", replica.port.to_string())
            .env("AL_CHAT_LOG_DIR", &log_dir)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        replica.child = Some(command.spawn().unwrap());
        listening(replica.port).await;
    }

    /// SIGTERM, and the exit code once it has exited.
    async fn stop_replica(&mut self, i: usize) -> Option<i32> {
        let mut child = self.replicas[i].child.take().unwrap();
        signal(&child, "-TERM");
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        status.code()
    }

    fn kill_replica(&mut self, i: usize) {
        let mut child = self.replicas[i].child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Stack {
    /// nginx's error log, for failure messages: why it answered 502.
    fn nginx_errors(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Front {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn chat(&self, client: &reqwest::Client) -> Result<u16, String> {
        let response = client
            .post(self.url("/api/chat"))
            .json(&json!({"message": "hi"}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(|e| e.to_string())?;
        if status == 200 {
            Ok(status)
        } else {
            Err(format!("{status} {body}"))
        }
    }

    async fn usage(&self) -> Value {
        self.client
            .get(self.url("/api/openai/usage"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for replica in &mut self.replicas {
            if let Some(mut child) = replica.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = self.nginx.kill();
        let _ = self.nginx.wait();
    }
}

fn signal(child: &Child, which: &str) {
    let ok = Command::new("kill")
        .args([which, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

async fn listening(port: u16) {
    eventually_seeing(
        &format!("127.0.0.1:{port} to accept connections"),
        Duration::from_secs(10),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
        |up| *up,
    )
    .await;
}

/// A client whose connections come from `address` (the nginx log and `X-Forwarded-For` see it).
fn client_from(address: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(address.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_deltas_pass_through_nginx_as_they_are_produced() {
    let (openai, papita) = (MockOpenAi::start().await, MockPapita::start().await);
    let gap = Duration::from_millis(300);
    openai.set_default(Reply::Stream(StreamScript {
        deltas: vec!["One".into(), " two".into(), " three".into(), " four".into()],
        usage: Some((9, 4)),
        gap,
        ..Default::default()
    }));
    let stack = Stack::start(&openai, &papita, &[]).await;
    let front = &stack.front;
    let response = front
        .client
        .post(front.url("/api/chat"))
        .json(&json!({"message": "count", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = String::from_utf8_lossy(&chunk.unwrap()).to_string();
        for _ in chunk.matches("event: delta") {
            arrivals.push(Instant::now());
        }
        text.push_str(&chunk);
    }
    assert_eq!(arrivals.len(), 4, "{text}");
    assert!(text.contains("event: done"), "{text}");
    // Three gaps of 300 ms upstream: the deltas must not arrive together at the end.
    let spread = arrivals[3] - arrivals[0];
    assert!(spread >= 3 * gap - Duration::from_millis(150), "{spread:?}");
    for pair in arrivals.windows(2) {
        assert!(pair[1] - pair[0] >= gap / 2, "{:?}", pair[1] - pair[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_address_behind_nginx_gets_its_own_rate_limit() {
    let (openai, papita) = (MockOpenAi::start().await, MockPapita::start().await);
    openai.set_default(Reply::text("ok", 3, 1));
    let stack = Stack::start(&openai, &papita, &[("RATE_LIMIT_CHAT_PER_MIN", "2")]).await;
    let front = &stack.front;
    let (a, b) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    // Two replicas behind one nginx, one limit per client shared on Redis.
    assert_eq!(front.chat(&a).await, Ok(200));
    assert_eq!(front.chat(&a).await, Ok(200));
    let third = front.chat(&a).await.unwrap_err();
    assert!(third.starts_with("429"), "{third}");
    assert_eq!(
        front.chat(&b).await,
        Ok(200),
        "another address, its own allowance"
    );
    assert_eq!(front.chat(&b).await, Ok(200));
    assert!(front.chat(&b).await.unwrap_err().starts_with("429"));
}

/// One chat of the load: when it was sent, and its status or what went wrong.
type Sent = (Instant, Result<u16, String>);
/// The load's clients, each with every chat it sent.
type Load = Vec<tokio::task::JoinHandle<Vec<Sent>>>;

/// Clients sending chats one after another until `stop`; each result with when it was sent.
fn steady_load(front: &Arc<Front>, clients: usize, stop: &Arc<AtomicBool>) -> Load {
    (0..clients)
        .map(|_| {
            let (front, stop) = (front.clone(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let mut results = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let sent = Instant::now();
                    results.push((sent, front.chat(&client).await));
                }
                results
            })
        })
        .collect()
}

async fn collect(load: Load) -> Vec<Sent> {
    let mut all = Vec::new();
    for task in load {
        all.extend(task.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_steady_load_answers_every_request() {
    let (openai, papita) = (MockOpenAi::start().await, MockPapita::start().await);
    openai.set_default(Reply::slow("ok", Duration::from_millis(20)));
    let mut stack = Stack::start(&openai, &papita, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&stack.front, 4, &stop);
    // Time is the point here: the restarts happen under load that keeps going.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..2 {
        assert_eq!(
            stack.stop_replica(i).await,
            Some(0),
            "replica {i} exits 0 on SIGTERM"
        );
        stack.start_replica(i).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let results = collect(load).await;
    let failed: Vec<_> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed, the first: {:?}; nginx says:\n{}",
        failed.len(),
        results.len(),
        failed.first(),
        stack.nginx_errors()
    );
    assert!(results.len() >= 20, "steady load: {} chats", results.len());
    // Every answered chat is counted once in the shared totals, whichever replica answered it.
    let answered = results.len() as u64;
    eventually_seeing(
        "the shared totals to equal the chats answered",
        Duration::from_secs(10),
        || stack.front.usage(),
        |u| u["request_count"] == answered,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_fails_only_the_requests_in_flight_on_that_replica() {
    let (openai, papita) = (MockOpenAi::start().await, MockPapita::start().await);
    let slow = Duration::from_millis(400);
    openai.set_default(Reply::slow("ok", slow));
    let mut stack = Stack::start(&openai, &papita, &[]).await;
    let clients = 6;
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&stack.front, clients, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.kill_replica(0);
    // The process is gone (reaped): its sockets are closed. A request nginx sends in the next
    // moment may still go out on a keep-alive connection to it whose close nginx has not read
    // yet; that request was on its way to the dying replica too. After this window, nginx knows.
    let dead_at = Instant::now() + Duration::from_millis(500);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let results = collect(load).await;
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failed.len() <= clients,
        "{} failed, more than were in flight",
        failed.len()
    );
    for (sent, result) in &failed {
        assert!(
            *sent < dead_at,
            "a request sent after the replica was gone failed: {result:?}"
        );
    }
    let after: Vec<_> = results.iter().filter(|(s, _)| *s > dead_at).collect();
    assert!(!after.is_empty() && after.iter().all(|(_, r)| r.is_ok()));
}
