//! Ports on loopback, shared by the integration tests and the benchmark harness
//! (`benches/harness/main.rs` includes this file).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A port nothing listens on right now (the caller binds it next).
pub fn free_port() -> u16 {
    closed_address().port()
}

/// An address where nothing listens (connections are refused at once).
pub fn closed_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits until something accepts connections on `port`; fails after 30 s.
pub fn wait_listening(port: u16) {
    wait_for(
        &format!("a listener on {port}"),
        Duration::from_secs(30),
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
}

/// Polls `check` (state of another process, which cannot notify us) until it holds; fails
/// after `within` instead of hanging. The one poll pause of the synchronous tests.
pub fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
