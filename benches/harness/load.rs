//! Load generators and their results: wrk (closed loop, its output parsed into `WrkResult`),
//! our open-loop generator at a fixed rate (`RateResult`), and time to the first streamed delta
//! (`Percentiles`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// p50 and p99 in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One open-loop run at a fixed rate.
#[derive(Debug, Clone, Copy)]
pub struct RateResult {
    pub latency: Percentiles,
    pub requests: u64,
    pub errors: u64,
}

pub fn open_loop(url: &str, rps: u64, secs: u64, body: &str) {
    // Like wrk2: a fixed pool of senders, each on its own schedule (rate / SENDERS). Latency is
    // measured from when a request was due, not when it went out, so a server that falls behind
    // shows its queueing instead of hiding it (no coordinated omission).
    const SENDERS: u64 = 64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (url, body) = (url.to_string(), body.to_string());
    let results = rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(SENDERS as usize)
            .build()
            .unwrap();
        let per_sender = Duration::from_secs_f64(SENDERS as f64 / rps as f64);
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let mut senders = tokio::task::JoinSet::new();
        for k in 0..SENDERS {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            senders.spawn(async move {
                let offset = per_sender.mul_f64(k as f64 / SENDERS as f64);
                let mut results = Vec::new();
                for i in 0..(rps * secs / SENDERS) {
                    let due = start + offset + per_sender * i as u32;
                    tokio::time::sleep_until(due).await;
                    let request = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone());
                    let ok = match request.send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    results.push((due.elapsed(), ok));
                }
                results
            });
        }
        let mut all = Vec::new();
        while let Some(r) = senders.join_next().await {
            all.extend(r.unwrap());
        }
        all
    });
    let errors = results.iter().filter(|(_, ok)| !ok).count();
    let mut latencies: Vec<Duration> = results.into_iter().map(|(d, _)| d).collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{} {} {} {}",
        pct(0.5).as_micros(),
        pct(0.99).as_micros(),
        latencies.len(),
        errors
    );
}

#[derive(Debug, Default, Clone)]
pub struct WrkResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    pub errors: u64,
}

pub fn wrk(
    url: &str,
    connections: u32,
    secs: u32,
    script: Option<&Path>,
    timeout_s: u32,
) -> WrkResult {
    let threads = 2.min(connections);
    let mut cmd = Command::new("wrk");
    cmd.args([
        "--latency",
        &format!("-t{threads}"),
        &format!("-c{connections}"),
        &format!("-d{secs}s"),
    ]);
    cmd.arg(format!("--timeout={timeout_s}s"));
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("wrk runs (benches/run installs it)");
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn parse_wrk(text: &str) -> WrkResult {
    let mut r = WrkResult::default();
    let ms = |v: &str| -> f64 {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = n.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            "m" => n * 60_000.0,
            _ => f64::NAN,
        }
    };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => r.p50_ms = ms(v),
            ["99%", v] => r.p99_ms = ms(v),
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    r
}

pub fn lua(dir: &Path, name: &str, body: &str, path_note: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "-- {path_note}\nwrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"").unwrap();
    path
}

/// Runs the open-loop generator in its own process (its CPU is not ours to measure).
pub fn rate(url: &str, rps: u64, secs: u64, body: &str) -> RateResult {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["rate", url, &rps.to_string(), &secs.to_string(), body])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    RateResult {
        latency: Percentiles {
            p50_ms: v[0] as f64 / 1000.0,
            p99_ms: v[1] as f64 / 1000.0,
        },
        requests: v[2],
        errors: v[3],
    }
}

/// Runs `work` to its end on a runtime of its own (the orchestrator has none).
pub fn block_on<F: std::future::Future>(work: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(work)
}

/// Time to the first `delta` event over `n` sequential streamed requests.
pub fn first_delta(url: &str, body: &Value, marker: &[u8], n: usize) -> Percentiles {
    block_on(async {
        let client = reqwest::Client::new();
        let mut times = Vec::with_capacity(n);
        for i in 0..n + 20 {
            let started = Instant::now();
            let mut response = client.post(url).json(body).send().await.unwrap();
            let mut seen = Vec::new();
            while let Some(chunk) = response.chunk().await.unwrap() {
                seen.extend_from_slice(&chunk);
                if seen.windows(marker.len()).any(|w| w == marker) {
                    break;
                }
            }
            if i >= 20 {
                times.push(started.elapsed()); // the first 20 warm the connection pools
            }
            while response.chunk().await.unwrap().is_some() {}
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Percentiles {
            p50_ms: ms(times[n / 2]),
            p99_ms: ms(times[n * 99 / 100]),
        }
    })
}

/// Pause before each interleaved run, for the previous one's background work to finish.
const SETTLE: Duration = Duration::from_millis(1500);

/// Runs each closure `rounds` times, interleaved, and returns each one's median run: on a small,
/// noisy machine the comparison is only fair if all sides see the same moments. Each round starts
/// one place later (a b c, b c a, c a b, ...), and every run is preceded by a pause: a service
/// finishes its background work (Papita records, log lines) after its load stops, and without
/// the pause the next run in a fixed order always paid for it (the same binary measured 13 to
/// 34 % apart depending on its place).
pub fn interleaved<const N: usize>(
    rounds: usize,
    runs: [&dyn Fn() -> WrkResult; N],
) -> [WrkResult; N] {
    let mut results: [Vec<WrkResult>; N] = std::array::from_fn(|_| Vec::new());
    for round in 0..rounds.max(N.min(3)) {
        for k in 0..N {
            let i = (round + k) % N;
            std::thread::sleep(SETTLE);
            results[i].push(runs[i]());
        }
    }
    results.map(|mut r| {
        r.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        r[r.len() / 2].clone()
    })
}
