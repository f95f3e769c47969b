//! Extractors for the guardrails that belong to HTTP: who the client is (its address, or the
//! first untrusted address in `X-Forwarded-For` when the peer is a trusted proxy), and the
//! optional admin token.

use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use ipnet::IpNet;
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

use crate::domain::UserIdentity;
use crate::http::error::ApiError;
use crate::services::guardrails::Limited;
use crate::state::AppState;

/// The client a rate limit counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        Ok(Self(client_ip(
            peer,
            &forwarded,
            &state.config.guardrails.trusted_proxies,
        )))
    }
}

/// The peer, unless it is a trusted proxy: then walk `X-Forwarded-For` from the right (the hop
/// nearest to us) and take the first address that is not a trusted proxy. A client can put
/// anything on the left of that header; only what our own proxies appended is believed.
///
/// Every address is taken in its canonical form: listening on `::`, IPv4 peers arrive as
/// IPv4-mapped IPv6 (`::ffff:10.0.0.2`), which must match IPv4 `TRUSTED_PROXIES` and share an
/// IPv4 client's rate limit.
pub fn client_ip(peer: IpAddr, forwarded: &str, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = peer.to_canonical();
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for hop in forwarded
        .rsplit(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
    {
        let Ok(ip) = hop.parse::<IpAddr>().map(|ip| ip.to_canonical()) else {
            break; // garbage: stop at the last address we could read
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// Which per-client limit a route's `RateChecked` applies.
pub trait RateLimitedRoute {
    const WHAT: Limited;
}

/// `/api/chat`.
pub struct ChatRoute;
impl RateLimitedRoute for ChatRoute {
    const WHAT: Limited = Limited::Chat;
}

/// `/api/openai/test`.
pub struct TestRoute;
impl RateLimitedRoute for TestRoute {
    const WHAT: Limited = Limited::Test;
}

/// `/api/session/start` and `/api/session/stop`, one allowance for both.
pub struct SessionRoute;
impl RateLimitedRoute for SessionRoute {
    const WHAT: Limited = Limited::Session;
}

/// The client, once its per-minute allowance for `R` had room. An extractor of the request head:
/// placed before the body's, a refused client costs no body read and no JSON parse (a chat body
/// may be 16 MB).
pub struct RateChecked<R>(pub IpAddr, pub PhantomData<R>);

impl<R: RateLimitedRoute + Send> FromRequestParts<AppState> for RateChecked<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ClientAddr(client) = ClientAddr::from_request_parts(parts, state).await?;
        state.guardrails.check_rate(R::WHAT, client).await?;
        Ok(Self(client, PhantomData))
    }
}

/// With `AUTH_JWT_*` set: who the request's bearer token, signed by the site, says is chatting
/// (401 JSON when it is missing or not valid). Without: `None`, and the body's fields count.
/// An extractor of the head, after the rate check (guessing tokens costs the allowance).
pub struct Verified(pub Option<UserIdentity>);

impl FromRequestParts<AppState> for Verified {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let authorization = parts.headers.get(header::AUTHORIZATION);
        Ok(Self(
            state
                .guardrails
                .verify(authorization.map(|v| v.as_bytes()))?,
        ))
    }
}

/// Whether the caller may see the operator's details: no `ADMIN_TOKEN` is set, or it sent it.
/// Never refuses (routes open to anyone show less instead).
pub struct AdminView(pub bool);

impl FromRequestParts<AppState> for AdminView {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(match &state.config.guardrails.admin_token {
            None => true,
            Some(expected) => token_matches(parts, expected.expose_secret()),
        }))
    }
}

/// Whether the request carries `Authorization: Bearer <expected>`, compared in constant time
/// (the comparison does not tell how much of a guess was right).
fn token_matches(parts: &Parts, expected: &str) -> bool {
    let given = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// Present on routes that need `ADMIN_TOKEN` when one is set (401 JSON otherwise).
pub struct AdminAccess;

impl FromRequestParts<AppState> for AdminAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = &state.config.guardrails.admin_token else {
            return Ok(Self);
        };
        if token_matches(parts, expected.expose_secret()) {
            Ok(Self)
        } else {
            state.guardrails.count_admin_token_refusal();
            Err(ApiError::AdminTokenRequired)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_counts_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // (peer, X-Forwarded-For, the client it names)
        let cases = [
            // An untrusted peer's header is ignored.
            ("203.0.113.9", "1.2.3.4", "203.0.113.9"),
            // Through our proxy: the address it appended.
            ("10.0.0.2", "1.2.3.4, 198.51.100.7", "198.51.100.7"),
            // Two of our proxies: the first untrusted from the right.
            ("10.0.0.2", "198.51.100.7, 10.0.0.3", "198.51.100.7"),
            // No header: the proxy itself.
            ("10.0.0.2", "", "10.0.0.2"),
            // Listening on `::`, an IPv4 proxy arrives IPv4-mapped, and is still trusted.
            ("::ffff:10.0.0.2", "198.51.100.7", "198.51.100.7"),
            ("::ffff:203.0.113.9", "1.2.3.4", "203.0.113.9"),
            ("10.0.0.2", "::ffff:198.51.100.7", "198.51.100.7"),
        ];
        for (peer, forwarded, client) in cases {
            assert_eq!(
                client_ip(ip(peer), forwarded, &trusted),
                ip(client),
                "{peer} with {forwarded:?}"
            );
        }
    }
}
