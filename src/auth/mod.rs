//! Who may publish and who may see what: JWT verification and the `Access` a verified token
//! grants. Auth is off unless `--jwt-secret` or `--jwt-public-key` is given; then every request
//! carries an `Access` (or is refused with a `Denied`), and `/events` hands the subscribe
//! patterns to the hub, so every transport filters the same way. Nothing here knows HTTP: the
//! transports take the token from the request and map a `Denied` to their own answer.

mod access;
pub mod mint;

pub use access::{Access, Denied};

use crate::config::{JwtPublicKey, Secret};
use crate::filter::Patterns;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The query parameter EventSource clients put the token in (they cannot set headers).
pub const QUERY_PARAMETER: &str = "access_token";
/// The cookie a same-site (or `withCredentials`) page may carry the token in.
pub const COOKIE_NAME: &str = "taskstream_token";

/// The claims taskstream reads. Unknown claims (iss, aud, jti, ...) are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default)]
    pub taskstream: Rights,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rights {
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// What a verified token allows.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The token's `sub`; may be empty (rate limits then fall back to the client's IP).
    pub subject: String,
    pub publish: Patterns,
    pub subscribe: Patterns,
    /// When the token stops being accepted (its `exp` plus the leeway): open streams end then.
    pub expires_at: SystemTime,
}

/// A verifier built from `--jwt-secret` or `--jwt-public-key`.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    leeway: Duration,
}

impl Authenticator {
    pub fn hs256(secret: &Secret, leeway: Duration) -> Authenticator {
        Self::new(
            DecodingKey::from_secret(secret.expose().as_bytes()),
            &[Algorithm::HS256],
            leeway,
        )
    }

    pub fn public_key(key: &JwtPublicKey, leeway: Duration) -> Authenticator {
        Self::new(key.key.clone(), key.algorithms, leeway)
    }

    fn new(key: DecodingKey, algorithms: &[Algorithm], leeway: Duration) -> Authenticator {
        // The algorithm list is fixed by the key, never taken from the token's header: that is
        // what rules out `alg: none` and HS256-signed-with-the-public-key confusion.
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms.to_vec();
        validation.leeway = leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // taskstream has no audience of its own to check; a deployment that shares its key with
        // other services should give taskstream a key of its own (docs/security.md).
        validation.validate_aud = false;
        validation.required_spec_claims = ["exp".to_owned()].into();
        Authenticator {
            key,
            validation,
            leeway,
        }
    }

    /// Verifies a token; the error says what is wrong without echoing the token.
    pub fn verify(&self, token: &str) -> Result<Grant, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| describe(e.kind()))?;
        let claims = data.claims;
        // A validly signed `exp` past what `SystemTime` holds (about 2^63 s) would panic here.
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .and_then(|exp| exp.checked_add(self.leeway))
            .ok_or_else(|| "the token's exp is out of range".to_owned())?;
        // jsonwebtoken compares whole seconds and still accepts a token during its `exp` second;
        // open streams end at `exp` itself, so a reconnect in that second must be refused too,
        // or the client would loop through streams that end as soon as they open.
        if SystemTime::now() >= expires_at {
            return Err(describe(&ErrorKind::ExpiredSignature));
        }
        let patterns = |right: &str, texts: &[String]| {
            Patterns::parse(texts).map_err(|e| format!("the token's taskstream.{right}: {e}"))
        };
        Ok(Grant {
            publish: patterns("publish", &claims.taskstream.publish)?,
            subscribe: patterns("subscribe", &claims.taskstream.subscribe)?,
            subject: claims.sub,
            expires_at,
        })
    }
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidSignature => "the token's signature is invalid".into(),
        ErrorKind::InvalidAlgorithm => {
            "the token is signed with an algorithm this server does not accept".into()
        }
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no `{claim}` claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("the token's `{claim}` claim is malformed"),
        ErrorKind::Json(e) => format!("the token's claims are malformed: {e}"),
        _ => "the token is malformed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::mint::{mint, Mint};
    use super::*;
    use crate::task::TaskId;
    use jsonwebtoken::{EncodingKey, Header};

    fn secret() -> Secret {
        "test-secret".parse().unwrap()
    }

    fn token(subscribe: &[&str], ttl: Duration) -> String {
        let subscribe: Vec<String> = subscribe.iter().map(|s| s.to_string()).collect();
        mint(
            &Mint {
                subject: "ana",
                publish: &["*".to_owned()],
                subscribe: &subscribe,
                ttl,
            },
            Some(&secret()),
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_minted_token_verifies_and_carries_its_rights() {
        let auth = Authenticator::hs256(&secret(), Duration::ZERO);
        let grant = auth
            .verify(&token(&["101"], Duration::from_secs(60)))
            .unwrap();
        assert_eq!(grant.subject, "ana");
        assert!(grant.subscribe.matches(&TaskId::Number(101)));
        assert!(!grant.subscribe.matches(&TaskId::Number(102)));
        assert!(grant.publish.matches(&TaskId::Number(102)));
        let other = Authenticator::hs256(&"other".parse().unwrap(), Duration::ZERO);
        assert_eq!(
            other
                .verify(&token(&["*"], Duration::from_secs(60)))
                .unwrap_err(),
            "the token's signature is invalid"
        );
        assert_eq!(auth.verify("abc").unwrap_err(), "the token is malformed");
    }

    #[test]
    fn expired_and_unsigned_tokens_are_refused() {
        let auth = Authenticator::hs256(&secret(), Duration::ZERO);
        let header = r#"{"alg":"none","typ":"JWT"}"#;
        let claims = r#"{"sub":"x","exp":9999999999,"taskstream":{"subscribe":["*"]}}"#;
        use base64_url::encode;
        let unsigned = format!("{}.{}.", encode(header), encode(claims));
        assert!(auth.verify(&unsigned).is_err());
        let past = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "x".into(),
                exp: 1_000_000_000,
                iat: None,
                taskstream: Rights::default(),
            },
            &EncodingKey::from_secret(b"test-secret"),
        )
        .unwrap();
        assert_eq!(auth.verify(&past).unwrap_err(), "the token has expired");
    }

    /// A tiny base64url encoder, so the test needs no extra crate.
    mod base64_url {
        pub fn encode(text: &str) -> String {
            const ALPHABET: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let bytes = text.as_bytes();
            let mut out = String::new();
            for chunk in bytes.chunks(3) {
                let b = [
                    chunk[0],
                    *chunk.get(1).unwrap_or(&0),
                    *chunk.get(2).unwrap_or(&0),
                ];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..=chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                }
            }
            out
        }
    }

    /// An RSA pair made for these tests only (tests/fixtures), since rcgen cannot make RSA keys.
    #[test]
    fn an_rsa_public_key_verifies_rs256_and_refuses_what_it_did_not_sign() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let key = JwtPublicKey::from_file(&format!("{fixtures}/rsa-test-public.pem")).unwrap();
        assert_eq!(key.algorithms, [Algorithm::RS256]);
        let auth = Authenticator::public_key(&key, Duration::ZERO);
        let private = std::fs::read(format!("{fixtures}/rsa-test-private.pem")).unwrap();
        let rights = ["*".to_owned()];
        let mint_with = |secret: Option<&Secret>, private: Option<&[u8]>| {
            mint(
                &Mint {
                    subject: "ana",
                    publish: &rights,
                    subscribe: &rights,
                    ttl: Duration::from_secs(60),
                },
                secret,
                private,
            )
            .unwrap()
        };
        let signed = mint_with(None, Some(&private));
        assert_eq!(auth.verify(&signed).unwrap().subject, "ana");
        let hs256 = mint_with(Some(&secret()), None);
        assert!(auth.verify(&hs256).unwrap_err().contains("algorithm"));
        let garbage = std::env::temp_dir().join(format!("not-a-key-{}", std::process::id()));
        std::fs::write(&garbage, "hello").unwrap();
        assert!(JwtPublicKey::from_file(garbage.to_str().unwrap())
            .unwrap_err()
            .contains("no RSA or EC public key"));
    }
}
