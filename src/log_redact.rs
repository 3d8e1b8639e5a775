//! What the logs must never hold: credentials in request lines, and control characters that
//! would let a logged value (a token's `sub`) start a forged log line.

/// Query parameters whose value is a credential. The server reads only `access_token`, but the
/// board reads `token`, and a client that misspells the name (`ACCESS_TOKEN`, `jwt`, `apikey`)
/// must not have its token logged for the mistake. A parameter name counts when, decoded,
/// lowercased and stripped of everything but letters and digits, it contains one of these.
const CREDENTIAL_WORDS: &[&str] = &[
    "token",
    "jwt",
    "bearer",
    "auth",
    "secret",
    "password",
    "passwd",
    "apikey",
    "credential",
    "session",
    "signature",
];

/// Whether the (still percent-encoded) query parameter name `key` names a credential.
pub fn is_credential_parameter(key: &str) -> bool {
    let decoded: String = form_urlencoded::parse(key.as_bytes())
        .next()
        .map(|(k, _)| k.into_owned())
        .unwrap_or_default();
    let normalized: String = decoded
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    CREDENTIAL_WORDS
        .iter()
        .any(|word| normalized.contains(word))
}

/// Replaces every JWT-shaped run (`eyJ` then three base64url segments) with `[redacted]`,
/// wherever it sits: a path segment, a `;` parameter, a misnamed query parameter.
pub fn redact_jwts(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("eyJ") {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        let len = jwt_len(candidate);
        if len > 0 {
            out.push_str("[redacted]");
            rest = &candidate[len..];
        } else {
            out.push_str("eyJ");
            rest = &candidate[3..];
        }
    }
    out.push_str(rest);
    out
}

/// The length of the JWT at the start of `text`, or 0: two dots between non-empty base64url
/// segments (the signature may be empty, as in an `alg: none` token).
fn jwt_len(text: &str) -> usize {
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let bytes = text.as_bytes();
    let mut end = 0;
    for segment in 0..3 {
        let start = end;
        while end < bytes.len() && is_b64(bytes[end]) {
            end += 1;
        }
        if end == start && segment < 2 {
            return 0;
        }
        if segment < 2 {
            if bytes.get(end) != Some(&b'.') {
                return 0;
            }
            end += 1;
        }
    }
    end
}

/// `text` with control characters (newlines, escapes, NUL...) written as `\n`, `\u{1b}`, and so
/// on, so one logged value stays on its line and cannot move the terminal's cursor.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_names_are_recognised_in_every_spelling() {
        for key in [
            "access_token",
            "token",
            "ACCESS_TOKEN",
            "access%5Ftoken",
            "%61ccess_token",
            "access_token%00",
            "jwt",
            "id_token",
            "apiKey",
            "api_key",
            "Authorization",
        ] {
            assert!(is_credential_parameter(key), "{key}");
        }
        for key in ["task_id", "transport", "last_event_id", "heartbeat"] {
            assert!(!is_credential_parameter(key), "{key}");
        }
    }

    #[test]
    fn jwts_are_redacted_wherever_they_are() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbmEifQ.c2ln-_";
        assert_eq!(
            redact_jwts(&format!("GET /tasks;t={jwt}/x?a={jwt}&b=1 HTTP/1.1")),
            "GET /tasks;t=[redacted]/x?a=[redacted]&b=1 HTTP/1.1"
        );
        assert_eq!(
            redact_jwts("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0."),
            "[redacted]"
        );
        assert_eq!(redact_jwts("/eyJ/eyJx.y"), "/eyJ/eyJx.y");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("ana"), "ana");
        assert_eq!(
            escape_controls("ana\n[INFO] forged\r\u{1b}[2J"),
            "ana\\n[INFO] forged\\r\\u{1b}[2J"
        );
    }
}
