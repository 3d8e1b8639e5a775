//! Who may publish and who may see what: JWT verification, the `taskstream` claim's task patterns,
//! and the `Access` extractor every protected handler takes.
//!
//! Auth is off unless `--jwt-secret` or `--jwt-public-key` is given; then `Access` is either the
//! verified token's `Grant` or a 401. Handlers ask `Access` about each task (403 when refused),
//! and `/events` hands the subscribe patterns to the hub, so every transport filters the same way.

use crate::app::AppState;
use crate::error::ApiError;
use crate::hub::TaskFilter;
use crate::task::TaskId;
use actix_web::http::header;
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The query parameter EventSource clients put the token in (they cannot set headers).
pub const QUERY_PARAMETER: &str = "access_token";
/// The cookie a same-site (or `withCredentials`) page may carry the token in.
pub const COOKIE_NAME: &str = "taskstream_token";

/// One task pattern from a token: `*`, an exact task id, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    All,
    Exact(TaskId),
    /// Matched against the id's text as it appears on the wire (`101`, `proj-7:a`).
    Prefix(Box<str>),
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Pattern, String> {
        let invalid = || {
            format!(
                "`{}` is not a task pattern (`*`, a task id, or a prefix ending in `*`)",
                text.chars().take(140).collect::<String>()
            )
        };
        match text.strip_suffix('*') {
            Some("") => Ok(Pattern::All),
            // A prefix is held to the task id alphabet, so it can match something and a typo such
            // as `proj 7*` is refused rather than silently matching nothing.
            Some(prefix) => TaskId::parse(prefix)
                .map(|_| Pattern::Prefix(prefix.into()))
                .map_err(|_| invalid()),
            None => TaskId::parse(text)
                .map(Pattern::Exact)
                .map_err(|_| invalid()),
        }
    }
}

impl Pattern {
    pub fn matches(&self, task_id: &TaskId) -> bool {
        match (self, task_id) {
            (Pattern::All, _) => true,
            (Pattern::Exact(id), _) => id == task_id,
            (Pattern::Prefix(prefix), TaskId::Text(text)) => text.starts_with(&**prefix),
            (Pattern::Prefix(prefix), TaskId::Number(n)) => decimal_starts_with(*n, prefix),
        }
    }
}

/// `n.to_string().starts_with(prefix)` without allocating: this runs for every event on every
/// subscription whose token has a prefix pattern.
fn decimal_starts_with(mut n: u64, prefix: &str) -> bool {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    digits[start..].starts_with(prefix.as_bytes())
}

/// A token's patterns for one right; empty allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns(Arc<[Pattern]>);

impl Patterns {
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Patterns, String> {
        texts
            .iter()
            .map(|t| t.as_ref().parse())
            .collect::<Result<Vec<_>, _>>()
            .map(|p| Patterns(p.into()))
    }

    pub fn matches(&self, task_id: &TaskId) -> bool {
        self.0.iter().any(|p| p.matches(task_id))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

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

    fn authenticate(&self, req: &HttpRequest) -> Result<Access, ApiError> {
        let token = token_from(req).ok_or(ApiError::Unauthorized {
            message: format!(
                "a token is required: Authorization: Bearer, the {QUERY_PARAMETER} query parameter or the {COOKIE_NAME} cookie"
            ),
            invalid_token: false,
        })?;
        self.verify(&token)
            .map(|grant| Access::Token(Arc::new(grant)))
            .map_err(|message| ApiError::Unauthorized {
                message,
                invalid_token: true,
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

/// The token: `Authorization: Bearer`, else the `access_token` query parameter, else the cookie.
fn token_from(req: &HttpRequest) -> Option<Cow<'_, str>> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| Cow::Borrowed(token.trim()));
    bearer
        .or_else(|| {
            form_urlencoded::parse(req.query_string().as_bytes())
                .find(|(key, _)| key == QUERY_PARAMETER)
                .map(|(_, token)| Cow::Owned(token.into_owned()))
        })
        .or_else(|| {
            req.headers()
                .get_all(header::COOKIE)
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(name, _)| *name == COOKIE_NAME)
                .map(|(_, token)| Cow::Borrowed(token.trim_matches('"')))
        })
}

/// What the request may do: everything when auth is off, else what its token grants.
#[derive(Debug, Clone)]
pub enum Access {
    Open,
    Token(Arc<Grant>),
}

impl Access {
    pub fn subject(&self) -> Option<&str> {
        match self {
            Access::Token(grant) if !grant.subject.is_empty() => Some(&grant.subject),
            _ => None,
        }
    }

    /// `POST /update_task` and `DELETE /tasks/{id}` on this task.
    pub fn check_publish(&self, task_id: &TaskId) -> Result<(), ApiError> {
        match self {
            Access::Token(grant) if !grant.publish.matches(task_id) => Err(ApiError::Forbidden(
                format!("the token may not publish to task_id {task_id}"),
            )),
            _ => Ok(()),
        }
    }

    /// Reading anything at all (`/events`, `GET /tasks`): a token without subscribe rights gets
    /// a clear 403 rather than an empty stream that never says why.
    pub fn check_subscribe_any(&self) -> Result<(), ApiError> {
        match self {
            Access::Token(grant) if grant.subscribe.is_empty() => Err(ApiError::Forbidden(
                "the token has no subscribe rights".into(),
            )),
            _ => Ok(()),
        }
    }

    pub fn check_subscribe(&self, task_id: &TaskId) -> Result<(), ApiError> {
        if self.may_see(task_id) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "the token may not subscribe to task_id {task_id}"
            )))
        }
    }

    pub fn may_see(&self, task_id: &TaskId) -> bool {
        match self {
            Access::Open => true,
            Access::Token(grant) => grant.subscribe.matches(task_id),
        }
    }

    /// The subscribe patterns for the hub's filter; `None` when auth is off.
    pub fn subscribe_patterns(&self) -> Option<Patterns> {
        match self {
            Access::Open => None,
            Access::Token(grant) => Some(grant.subscribe.clone()),
        }
    }

    pub fn expires_at(&self) -> Option<SystemTime> {
        match self {
            Access::Open => None,
            Access::Token(grant) => Some(grant.expires_at),
        }
    }

    /// The filter for a subscription on any transport: the requested ids (`?task_id=`, empty for
    /// all) within what the token may see, until it expires. Asking for a task the token may
    /// not see is a 403 rather than a stream that stays silent.
    pub fn task_filter(&self, ids: HashSet<TaskId>) -> Result<TaskFilter, ApiError> {
        self.check_subscribe_any()?;
        for id in &ids {
            self.check_subscribe(id)?;
        }
        let until = self.expires_at().map(|expires| {
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::Instant::now() + left
        });
        Ok(TaskFilter {
            patterns: self.subscribe_patterns(),
            until,
            ..TaskFilter::ids(ids)
        })
    }

    /// Idempotency keys are per subject, so one client's key can never replay another's answer
    /// (which would show it a task it may not see).
    pub fn scope_idempotency_key(&self, key: String) -> String {
        match self {
            Access::Open => key,
            // Keys are visible ASCII, so the newline cannot be forged into another subject's key.
            Access::Token(grant) => format!("{}\n{key}", grant.subject),
        }
    }
}

impl FromRequest for Access {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Access, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let authenticator = req
            .app_data::<web::Data<AppState>>()
            .and_then(|state| state.auth.clone());
        std::future::ready(match authenticator {
            None => Ok(Access::Open),
            Some(authenticator) => authenticator.authenticate(req),
        })
    }
}

/// A secret that never shows in `Debug` output, `--help` or logs.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = String;

    fn from_str(text: &str) -> Result<Secret, String> {
        if text.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(Secret(text.to_owned()))
    }
}

/// `--jwt-public-key`: a PEM public key, read and checked when the flags are parsed.
#[derive(Clone)]
pub struct JwtPublicKey {
    key: DecodingKey,
    algorithms: &'static [Algorithm],
    path: PathBuf,
}

impl fmt::Debug for JwtPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "JwtPublicKey({}, {:?})",
            self.path.display(),
            self.algorithms
        )
    }
}

impl JwtPublicKey {
    /// An RSA key verifies RS256; an EC P-256 key ES256. Other curves are refused, as the docs and
    /// `taskstream token` (which signs ES256) know no other.
    pub fn from_file(path: &str) -> Result<JwtPublicKey, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let (key, algorithms): (_, &'static [Algorithm]) = match DecodingKey::from_rsa_pem(&pem) {
            Ok(key) => (key, &[Algorithm::RS256]),
            Err(_) => match DecodingKey::from_ec_pem(&pem) {
                Ok(_) if !is_p256(&pem) => {
                    return Err(format!(
                        "{path} holds an EC key on another curve than P-256: only ES256 (P-256) is supported"
                    ))
                }
                Ok(key) => (key, &[Algorithm::ES256]),
                Err(_) => {
                    return Err(format!(
                    "{path} holds no RSA or EC public key in PEM (\"-----BEGIN PUBLIC KEY-----\")"
                ))
                }
            },
        };
        Ok(JwtPublicKey {
            key,
            algorithms,
            path: path.into(),
        })
    }
}

/// Whether a PEM EC public key (SubjectPublicKeyInfo) names the P-256 curve: its DER holds the
/// curve's OID, 1.2.840.10045.3.1.7.
fn is_p256(pem: &[u8]) -> bool {
    const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    pem::parse(pem).is_ok_and(|block| {
        block
            .contents()
            .windows(P256_OID.len())
            .any(|w| w == P256_OID)
    })
}

/// The longest `--ttl` of `taskstream token`: a token valid longer is a key that never expires,
/// and beyond about 2^63 s `exp` no longer fits a time at all.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 366 * 86_400);

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

/// `90`, `90s`, `30m`, `1h`, `7d`.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 90s, 30m, 1h or 7d"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    if seconds == 0 {
        return Err("the time to live must be at least 1s".into());
    }
    if seconds > MAX_TTL.as_secs() {
        return Err(format!(
            "`{text}`: the time to live must be at most {}d (100 years)",
            MAX_TTL.as_secs() / 86_400
        ));
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ids_match_prefixes_like_their_decimal_text() {
        for (n, prefix) in [
            (101, "1"),
            (101, "10"),
            (101, "101"),
            (101, "1010"),
            (101, "2"),
            (0, "0"),
            (u64::MAX, "1844"),
            (7, ""),
        ] {
            assert_eq!(
                decimal_starts_with(n, prefix),
                n.to_string().starts_with(prefix),
                "{n} {prefix}"
            );
        }
    }
    use actix_web::test::TestRequest;

    fn id(text: &str) -> TaskId {
        TaskId::parse(text).unwrap()
    }

    #[test]
    fn patterns_match_all_exact_ids_and_prefixes() {
        let p = Patterns::parse(&["101", "proj-7:*"]).unwrap();
        assert!(p.matches(&id("101")));
        assert!(
            p.matches(&TaskId::Number(101)),
            "\"101\" and 101 are one task"
        );
        assert!(!p.matches(&id("0101")));
        assert!(!p.matches(&id("1011")));
        assert!(p.matches(&id("proj-7:a")));
        assert!(p.matches(&id("proj-7:")));
        assert!(!p.matches(&id("proj-70")));
        assert!(Patterns::parse(&["*"]).unwrap().matches(&id("anything")));
        assert!(Patterns::parse(&["10*"])
            .unwrap()
            .matches(&TaskId::Number(105)));
        assert!(!Patterns::parse::<&str>(&[]).unwrap().matches(&id("1")));
    }

    #[test]
    fn invalid_patterns_are_refused() {
        for bad in ["", "a b", "**", "proj 7*", "*x", "ä*"] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad:?}");
        }
    }

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

    #[test]
    fn the_token_comes_from_header_then_query_then_cookie() {
        let req = TestRequest::get()
            .uri("/events?access_token=q")
            .insert_header(("authorization", "Bearer h"))
            .insert_header(("cookie", "a=1; taskstream_token=c"))
            .to_http_request();
        assert_eq!(token_from(&req).as_deref(), Some("h"));
        let req = TestRequest::get()
            .uri("/events?x=1&access_token=q%2B")
            .insert_header(("authorization", "Basic abc"))
            .insert_header(("cookie", "taskstream_token=c"))
            .to_http_request();
        assert_eq!(token_from(&req).as_deref(), Some("q+"));
        let req = TestRequest::get()
            .uri("/events")
            .insert_header(("cookie", "a=1; taskstream_token=c; b=2"))
            .to_http_request();
        assert_eq!(token_from(&req).as_deref(), Some("c"));
        let req = TestRequest::get().uri("/events").to_http_request();
        assert_eq!(token_from(&req), None);
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

    #[test]
    fn ttls_take_units() {
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0s").is_err());
    }
}
