//! Optional verified identity (`AUTH_JWT_SECRET` / `AUTH_JWT_PUBLIC_KEY`): the site signs a
//! short-lived token naming who is chatting, and that token, not the body's `username` and
//! `isGuest`, says who is charged and recorded. Without a key the body's fields are taken as
//! they come (unverified, as in Flask).
//!
//! Only the configured algorithm is accepted: HS256 for a secret; RS256 or ES256 for a public
//! key, by the key's kind. `alg: none` is not an algorithm `jsonwebtoken` knows, and a token
//! whose header names another algorithm (the HS/RS confusion: an HS256 token "signed" with the
//! public key) is refused before its signature is looked at. `exp` is required and checked, as
//! is `nbf` when present, on the service's clock with at most `LEEWAY_SECS` of slack.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde::Deserialize;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::clock::Clock;
use crate::config::JwtKey;
use crate::domain::UserIdentity;
use crate::domain::identifier::check_optional;

/// Clock skew forgiven between the site and this service.
pub const LEEWAY_SECS: i64 = 60;

/// Why a request's identity was refused (401, with the sentence).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "Sign-in required: send Authorization: Bearer <token>, the token the site issues for this chat."
    )]
    Missing,
    #[error(
        "The sign-in token is signed with {found}; this service accepts only {expected}. Sign in again."
    )]
    WrongAlgorithm {
        found: String,
        expected: &'static str,
    },
    #[error("The sign-in token is not valid ({0}). Sign in again.")]
    Invalid(String),
    #[error("The sign-in token has expired. Sign in again.")]
    Expired,
    #[error("The sign-in token is not valid yet (nbf); check the clocks, or sign in again.")]
    NotYetValid,
    #[error("The sign-in token names no user (sub). Sign in again.")]
    NoSubject,
}

/// The claims read; anything else in the token is ignored.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    guest: bool,
    /// Seconds since the epoch (NumericDate may have a fraction).
    exp: Option<f64>,
    nbf: Option<f64>,
}

/// The verifier with the clock it checks `exp` and `nbf` against, and the tokens it verified
/// lately. The site issues a token per page and the chat window sends it with every chat:
/// checking its signature again each time cost 34,000 instructions a chat (13 % of one), a
/// lookup costs a hash of the token. Only a token that passed every check is remembered, under
/// its exact text, and its times are checked again on every use.
pub struct SiteIdentity {
    verifier: Verifier,
    clock: Arc<dyn Clock>,
    verified: Mutex<HashMap<Box<str>, Checked, foldhash::fast::RandomState>>,
}

/// Tokens remembered at most; past it the memory starts afresh (a client can fill it only with
/// tokens the site signed).
const REMEMBERED_TOKENS: usize = 4_096;

/// A token whose signature and claims passed: who it names and when it is valid.
struct Checked {
    user: UserIdentity,
    exp: f64,
    nbf: Option<f64>,
}

impl Checked {
    fn at(&self, now: i64) -> Result<UserIdentity, AuthError> {
        let (now, leeway) = (now as f64, LEEWAY_SECS as f64);
        if now > self.exp + leeway {
            return Err(AuthError::Expired);
        }
        if self.nbf.is_some_and(|nbf| now + leeway < nbf) {
            return Err(AuthError::NotYetValid);
        }
        Ok(self.user.clone())
    }
}

impl SiteIdentity {
    pub fn new(verifier: Verifier, clock: Arc<dyn Clock>) -> Self {
        Self {
            verifier,
            clock,
            verified: Mutex::default(),
        }
    }

    pub fn algorithm(&self) -> &'static str {
        self.verifier.algorithm()
    }

    /// The identity an `Authorization` header's value proves, now.
    pub fn verify(&self, authorization: Option<&[u8]>) -> Result<UserIdentity, AuthError> {
        let token = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(bearer)
            .ok_or(AuthError::Missing)?;
        let now = self.clock.now().timestamp();
        let remembered = self.lock().get(token).map(|checked| checked.at(now));
        if let Some(answer) = remembered {
            return answer;
        }
        let checked = self.verifier.check(token)?;
        let user = checked.at(now)?;
        let mut verified = self.lock();
        if verified.len() >= REMEMBERED_TOKENS {
            verified.clear();
        }
        verified.insert(token.into(), checked);
        Ok(user)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Checked, foldhash::fast::RandomState>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Verifier {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
}

impl Verifier {
    /// A verifier for `key`, or why it cannot verify anything (said at start-up).
    pub fn new(key: &JwtKey) -> Result<Self, String> {
        let (key, algorithm) = match key {
            JwtKey::Secret(secret) => (
                DecodingKey::from_secret(secret.expose_secret().as_bytes()),
                Algorithm::HS256,
            ),
            JwtKey::PublicPem(pem) => {
                let pem = pem.as_bytes();
                match DecodingKey::from_rsa_pem(pem) {
                    Ok(key) => (key, Algorithm::RS256),
                    Err(_) => match DecodingKey::from_ec_pem(pem) {
                        Ok(key) => (key, Algorithm::ES256),
                        Err(_) => {
                            return Err(
                                "expected an RSA or P-256 EC public key in PEM (-----BEGIN PUBLIC KEY-----)"
                                    .into(),
                            );
                        }
                    },
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        // Time is checked below on the service's clock (tests move it); `exp` is required there.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        Ok(Self {
            key,
            algorithm,
            validation,
        })
    }

    /// The algorithm tokens must be signed with.
    pub fn algorithm(&self) -> &'static str {
        name(self.algorithm)
    }

    /// A token's algorithm, signature and claims (its times are checked by `Checked::at`).
    fn check(&self, token: &str) -> Result<Checked, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("its header is not a JWT header".into()))?;
        if header.alg != self.algorithm {
            return Err(AuthError::WrongAlgorithm {
                found: name(header.alg).into(),
                expected: name(self.algorithm),
            });
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(describe(&e)))?
            .claims;
        let exp = claims
            .exp
            .ok_or_else(|| AuthError::Invalid("it has no exp".into()))?;
        let sub = claims
            .sub
            .filter(|s| !s.trim().is_empty())
            .ok_or(AuthError::NoSubject)?;
        check_optional("sub", Some(&sub)).map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(Checked {
            user: UserIdentity {
                username: sub,
                is_guest: claims.guest,
                verified: true,
            },
            exp,
            nbf: claims.nbf,
        })
    }
}

/// `Bearer <token>`, the scheme in any case (RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
    }
}

/// What was wrong, in words that give nothing away about the key.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => "its signature does not match".into(),
        ErrorKind::InvalidAlgorithm => "its algorithm is not the one configured".into(),
        ErrorKind::Json(_) => "its claims are not the expected JSON".into(),
        _ => "it is not a well-formed JWT".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A remembered token is still checked for time on every use, and a forged one is never
    /// remembered.
    #[test]
    fn remembered_tokens_expire_on_time_and_forgeries_are_not_remembered() {
        use crate::clock::ManualClock;
        use chrono::TimeZone;
        let secret = "a-secret-of-at-least-thirty-two-bytes-for-hs256";
        let start = chrono::Local
            .with_ymd_and_hms(2026, 12, 7, 12, 0, 0)
            .unwrap();
        let clock = Arc::new(ManualClock::new(start));
        let identity = SiteIdentity::new(
            Verifier::new(&JwtKey::Secret(secret.into())).unwrap(),
            clock.clone(),
        );
        let sign = |key: &str, exp: i64| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &serde_json::json!({"sub": "ana", "exp": exp}),
                &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
            )
            .unwrap()
        };
        let token = format!("Bearer {}", sign(secret, start.timestamp() + 300));
        let user = identity.verify(Some(token.as_bytes())).unwrap();
        assert_eq!((user.username.as_str(), user.verified), ("ana", true));
        assert_eq!(identity.lock().len(), 1);
        assert!(identity.verify(Some(token.as_bytes())).is_ok());
        clock.set(start + chrono::Duration::seconds(300 + LEEWAY_SECS + 1));
        assert_eq!(
            identity.verify(Some(token.as_bytes())),
            Err(AuthError::Expired)
        );
        let forged = format!(
            "Bearer {}",
            sign("another-secret-another-secret-another!!", i64::MAX / 2)
        );
        assert!(identity.verify(Some(forged.as_bytes())).is_err());
        assert_eq!(identity.lock().len(), 1, "a forgery is not remembered");
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
