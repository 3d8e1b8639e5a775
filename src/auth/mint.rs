//! `taskstream token`: minting a token locally, signed the way the server verifies it.

use super::{Claims, Rights};
use crate::config::Secret;
use crate::filter::Patterns;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `taskstream token`: what to put in a locally minted token.
pub struct Mint<'a> {
    pub subject: &'a str,
    pub publish: &'a [String],
    pub subscribe: &'a [String],
    pub ttl: Duration,
}

/// Signs a token with the HS256 secret, or with a PEM private key (RS256 for RSA, ES256 for EC).
pub fn mint(
    mint: &Mint<'_>,
    secret: Option<&Secret>,
    private_key: Option<&[u8]>,
) -> Result<String, String> {
    // Refuse what the server would refuse, before it is handed to anyone.
    Patterns::parse(mint.publish).map_err(|e| format!("--publish: {e}"))?;
    Patterns::parse(mint.subscribe).map_err(|e| format!("--subscribe: {e}"))?;
    let (header, key) = match (secret, private_key) {
        (Some(secret), _) => (
            Header::new(Algorithm::HS256),
            EncodingKey::from_secret(secret.expose().as_bytes()),
        ),
        (None, Some(pem)) => match EncodingKey::from_rsa_pem(pem) {
            Ok(key) => (Header::new(Algorithm::RS256), key),
            Err(_) => (
                Header::new(Algorithm::ES256),
                EncodingKey::from_ec_pem(pem)
                    .map_err(|_| "the private key is neither RSA nor EC P-256 PEM".to_owned())?,
            ),
        },
        (None, None) => return Err("give --jwt-secret or --jwt-private-key".into()),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the clock is before 1970".to_owned())?;
    let claims = Claims {
        sub: mint.subject.to_owned(),
        exp: (now + mint.ttl).as_secs(),
        iat: Some(now.as_secs()),
        taskstream: Rights {
            publish: mint.publish.to_vec(),
            subscribe: mint.subscribe.to_vec(),
        },
    };
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| format!("cannot sign: {e}"))
}
