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

use std::sync::Arc;

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

/// The verifier with the clock it checks `exp` and `nbf` against.
pub struct SiteIdentity {
    verifier: Verifier,
    clock: Arc<dyn Clock>,
}

impl SiteIdentity {
    pub fn new(verifier: Verifier, clock: Arc<dyn Clock>) -> Self {
        Self { verifier, clock }
    }

    pub fn algorithm(&self) -> &'static str {
        self.verifier.algorithm()
    }

    /// The identity an `Authorization` header's value proves, now.
    pub fn verify(&self, authorization: Option<&[u8]>) -> Result<UserIdentity, AuthError> {
        self.verifier
            .verify(authorization, self.clock.now().timestamp())
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

    /// The identity in an `Authorization` header's value, checked at `now` (seconds since the
    /// epoch).
    pub fn verify(
        &self,
        authorization: Option<&[u8]>,
        now: i64,
    ) -> Result<UserIdentity, AuthError> {
        let token = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(bearer)
            .ok_or(AuthError::Missing)?;
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
        let now = now as f64;
        let leeway = LEEWAY_SECS as f64;
        match claims.exp {
            None => return Err(AuthError::Invalid("it has no exp".into())),
            Some(exp) if now > exp + leeway => return Err(AuthError::Expired),
            Some(_) => {}
        }
        if claims.nbf.is_some_and(|nbf| now + leeway < nbf) {
            return Err(AuthError::NotYetValid);
        }
        let sub = claims
            .sub
            .filter(|s| !s.trim().is_empty())
            .ok_or(AuthError::NoSubject)?;
        check_optional("sub", Some(&sub)).map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(UserIdentity {
            username: sub,
            is_guest: claims.guest,
            verified: true,
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

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
