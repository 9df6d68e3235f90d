//! Request parameters and management-token checks (reference-scheduler.md §6, Authentication).
//!
//! Invariants: a token is gathered from the `Authorization: Bearer|OAuth2` header, the Basic-auth
//! password, the `api_token` query or form parameter and the `arvados_api_token` cookie
//! (base64url); the comparison with the management token takes the same time whatever the
//! tokens' contents; no function here logs, and no error or `Debug` output holds a token.

use std::fmt;

use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE};

/// Query-string and form-body parameters, in order (query first).
#[derive(Clone, Default)]
pub struct Params(Vec<(String, String)>);

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Parameters may carry `api_token`: print the names only.
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

impl Params {
    /// Parameters from a query string and, when given, an `application/x-www-form-urlencoded`
    /// body.
    pub fn parse(query: Option<&str>, form_body: Option<&[u8]>) -> Params {
        let mut v = Vec::new();
        if let Some(q) = query {
            v.extend(parse_urlencoded(q.as_bytes()));
        }
        if let Some(b) = form_body {
            v.extend(parse_urlencoded(b));
        }
        Params(v)
    }

    /// The first non-empty value of `name` (Go's `FormValue` returns the first value; an empty
    /// one counts as missing for every parameter the API reads).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// Every value of `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Decodes `application/x-www-form-urlencoded` pairs; malformed escapes are kept literally.
pub fn parse_urlencoded(input: &[u8]) -> Vec<(String, String)> {
    input
        .split(|b| *b == b'&' || *b == b';')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = match pair.iter().position(|b| *b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &[][..]),
            };
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `s`, with `+` as a space.
pub fn percent_decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decodes base64 in the standard or the URL-safe alphabet, padded or not. `None` if `s` is not
/// base64.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover sextet cannot encode a byte.
    if bits >= 6 {
        return None;
    }
    Some(out)
}

/// Every token the request carries, in Arvados' order of sources.
pub fn request_tokens(headers: &HeaderMap, params: &Params) -> Vec<String> {
    let mut tokens = Vec::new();
    for h in headers.get_all(AUTHORIZATION) {
        let Ok(h) = h.to_str() else { continue };
        let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("Bearer") || scheme.eq_ignore_ascii_case("OAuth2") {
            if !rest.is_empty() {
                tokens.push(rest.to_string());
            }
        } else if scheme.eq_ignore_ascii_case("Basic")
            && let Some(raw) = base64_decode(rest)
            && let Ok(text) = String::from_utf8(raw)
            && let Some((_, password)) = text.split_once(':')
            && !password.is_empty()
        {
            tokens.push(password.to_string());
        }
    }
    tokens.extend(
        params
            .all("api_token")
            .filter(|t| !t.is_empty())
            .map(String::from),
    );
    for h in headers.get_all(COOKIE) {
        let Ok(h) = h.to_str() else { continue };
        for c in h.split(';') {
            if let Some((name, value)) = c.trim().split_once('=')
                && name == "arvados_api_token"
                && let Some(raw) = base64_decode(value)
                && let Ok(t) = String::from_utf8(raw)
                && !t.is_empty()
            {
                tokens.push(t);
            }
        }
    }
    tokens
}

/// Compares two tokens in time that depends only on their lengths.
pub fn token_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The outcome of checking a request against the management token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A token matched.
    Allowed,
    /// The management token is empty: 403 `Management API authentication is not configured`.
    NotConfigured,
    /// No token at all: 401 `Unauthorized`.
    Unauthorized,
    /// Tokens present, none right: 403 `Forbidden`.
    Forbidden,
}

/// Checks a request's tokens against `management_token`.
pub fn check(management_token: &str, tokens: &[String]) -> Verdict {
    if management_token.is_empty() {
        Verdict::NotConfigured
    } else if tokens.is_empty() {
        Verdict::Unauthorized
    } else if tokens.iter().any(|t| token_eq(t, management_token)) {
        Verdict::Allowed
    } else {
        Verdict::Forbidden
    }
}

/// The health check's stricter rule: only the exact header `Authorization: Bearer <token>`.
pub fn check_health(management_token: &str, headers: &HeaderMap) -> Verdict {
    if management_token.is_empty() {
        return Verdict::NotConfigured;
    }
    match headers.get(AUTHORIZATION) {
        None => Verdict::Unauthorized,
        Some(h) => {
            let expected = format!("Bearer {management_token}");
            if token_eq(h.to_str().unwrap_or_default(), &expected) {
                Verdict::Allowed
            } else {
                Verdict::Forbidden
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn urlencoded_pairs() {
        let p = parse_urlencoded(b"a=1&b=x%20y+z&c&d=%zz&e=%4");
        assert_eq!(
            p,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y z".into()),
                ("c".into(), String::new()),
                ("d".into(), "%zz".into()),
                ("e".into(), "%4".into()),
            ]
        );
    }

    #[test]
    fn base64_both_alphabets() {
        assert_eq!(base64_decode("eHl6enk=").as_deref(), Some(&b"xyzzy"[..]));
        assert_eq!(base64_decode("eHl6enk").as_deref(), Some(&b"xyzzy"[..]));
        assert_eq!(base64_decode("-_8").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(base64_decode("+/8=").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(base64_decode("a"), None);
        assert_eq!(base64_decode("a b"), None);
    }

    #[test]
    fn tokens_from_every_source() {
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, HeaderValue::from_static("OAuth2 t1"));
        // "user:t2"
        h.append(
            AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjp0Mg=="),
        );
        // base64url("t3") = "dDM"
        h.append(
            COOKIE,
            HeaderValue::from_static("a=b; arvados_api_token=dDM"),
        );
        let p = Params::parse(Some("api_token=t4"), Some(b"api_token=t5"));
        assert_eq!(request_tokens(&h, &p), ["t1", "t2", "t4", "t5", "t3"]);
        assert_eq!(check("t3", &request_tokens(&h, &p)), Verdict::Allowed);
        assert_eq!(check("zz", &request_tokens(&h, &p)), Verdict::Forbidden);
        assert_eq!(check("zz", &[]), Verdict::Unauthorized);
        assert_eq!(check("", &[]), Verdict::NotConfigured);
    }

    #[test]
    fn params_debug_hides_values() {
        let p = Params::parse(Some("api_token=secret"), None);
        assert!(!format!("{p:?}").contains("secret"));
        assert_eq!(p.get("api_token"), Some("secret"));
        assert_eq!(Params::parse(Some("x="), None).get("x"), None);
    }
}
