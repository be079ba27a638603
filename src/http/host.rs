//! The `Host` rules of RFC 9112 §3.2 that hyper leaves to the server: "A
//! server MUST respond with a 400 (Bad Request) status code to any HTTP/1.1
//! request message that lacks a Host header field and to any request message
//! that contains more than one Host header field line or a Host header field
//! with an invalid field value."
//!
//! Behind nginx these never reach a worker (nginx enforces them and sends its
//! own `Host`), but notesd also listens on TCP directly (the embedded
//! defaults, the scale-out hosts). The caller answers 400 and closes the
//! connection: a peer that gets framing this wrong is not worth keeping.

use hyper::header::HOST;
use hyper::{HeaderMap, Version};

/// Why a request's `Host` is refused (the 400's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HostError {
    #[error("an HTTP/1.1 request must carry a Host header")]
    Missing,
    #[error("more than one Host header")]
    Repeated,
    #[error("the Host header is not a valid host[:port]")]
    Invalid,
}

/// Check the request's `Host` lines against RFC 9112 §3.2.
pub(crate) fn check(version: Version, headers: &HeaderMap) -> Result<(), HostError> {
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => Err(HostError::Missing),
        (None, _) => Ok(()),
        (Some(_), Some(_)) => Err(HostError::Repeated),
        (Some(value), None) if valid(value.as_bytes()) => Ok(()),
        (Some(_), None) => Err(HostError::Invalid),
    }
}

/// `uri-host [ ":" port ]` (RFC 3986 §3.2.2–3), or empty (allowed when the
/// target has no authority).
fn valid(value: &[u8]) -> bool {
    let (host, port) = match value.first() {
        Some(b'[') => match value.iter().position(|b| *b == b']') {
            Some(end) => (&value[..=end], &value[end + 1..]),
            None => return false,
        },
        _ => match value.iter().position(|b| *b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &value[value.len()..]),
        },
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    port_ok && (ip_literal(host) || reg_name(host))
}

/// `[` IPv6address `]` (IPvFuture is not accepted: nothing sends it).
fn ip_literal(host: &[u8]) -> bool {
    host.strip_prefix(b"[")
        .and_then(|h| h.strip_suffix(b"]"))
        .and_then(|h| std::str::from_utf8(h).ok())
        .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
}

/// `*( unreserved / pct-encoded / sub-delims )`, which also covers IPv4.
fn reg_name(host: &[u8]) -> bool {
    let mut i = 0;
    while i < host.len() {
        match host[i] {
            b'%' => {
                let hex = host.get(i + 1..i + 3);
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
                continue;
            }
            b if b.is_ascii_alphanumeric() => {}
            b'-' | b'.' | b'_' | b'~' => {}
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn with_hosts(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(HOST, HeaderValue::from_bytes(v).expect("a header value"));
        }
        h
    }

    #[test]
    fn valid_hosts_pass() {
        for v in [
            &b"localhost"[..],
            b"localhost:8000",
            b"notes.example.com",
            b"10.213.0.2:8000",
            b"[::1]",
            b"[::1]:8000",
            b"xn--bcher-kva.example",
            b"a%41b",
            b"",
            b"host:",
            b"3031:0",
        ] {
            assert_eq!(
                check(Version::HTTP_11, &with_hosts(&[v])),
                Ok(()),
                "{}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn invalid_hosts_are_refused() {
        for v in [
            &b"a b"[..],
            b"a/b",
            b"a@b",
            b"a:b",
            b"a:80:80",
            b"a:123456",
            b"[::1",
            b"[nope]",
            b"[::1]x",
            b"a%4",
            b"a%zz",
            b"\"quoted\"",
            b"a\tb",
            b"\xc3\xa9.example",
        ] {
            assert_eq!(
                check(Version::HTTP_11, &with_hosts(&[v])),
                Err(HostError::Invalid),
                "{}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn missing_is_refused_in_1_1_only_and_two_are_refused_always() {
        let none = HeaderMap::new();
        assert_eq!(check(Version::HTTP_11, &none), Err(HostError::Missing));
        assert_eq!(check(Version::HTTP_10, &none), Ok(()));
        let two = with_hosts(&[b"a", b"a"]);
        assert_eq!(check(Version::HTTP_11, &two), Err(HostError::Repeated));
        assert_eq!(check(Version::HTTP_10, &two), Err(HostError::Repeated));
    }
}
