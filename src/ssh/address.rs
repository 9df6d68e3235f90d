//! Worker addresses: `host`, `host:port`, `[v6]:port` or a bare IPv6 address, plus the
//! configured `SSHPort` for addresses without a port (reference-workers.md §5.2).
//!
//! Invariant: a returned port is a valid TCP port number; the service name "ssh" (the config
//! loader's default) and "" mean 22.

use std::net::IpAddr;

use super::SshError;

/// The port used when neither the address nor `SSHPort` names one.
pub const DEFAULT_SSH_PORT: u16 = 22;

/// Splits `address` into host and port, using `default_port` when the address has none.
pub fn resolve_address(address: &str, default_port: &str) -> Result<(String, u16), SshError> {
    if address.is_empty() {
        return Err(SshError::NoAddress);
    }
    let bad = |reason: &str| SshError::BadAddress {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    // A bare IP address (IPv6 included) has no port.
    if address.parse::<IpAddr>().is_ok() {
        return Ok((address.to_string(), parse_port(default_port, address)?));
    }
    if let Some(rest) = address.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(bad("unclosed '['"));
        };
        if after.is_empty() {
            return Ok((host.to_string(), parse_port(default_port, address)?));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err(bad("expected ':' after ']'"));
        };
        return Ok((host.to_string(), parse_port(port, address)?));
    }
    match address.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => Err(bad("too many colons")),
        Some((host, port)) if !host.is_empty() => {
            Ok((host.to_string(), parse_port(port, address)?))
        }
        Some(_) => Err(bad("missing host")),
        None => Ok((address.to_string(), parse_port(default_port, address)?)),
    }
}

fn parse_port(port: &str, address: &str) -> Result<u16, SshError> {
    match port {
        "" | "ssh" => Ok(DEFAULT_SSH_PORT),
        p => p.parse::<u16>().map_err(|_| SshError::BadAddress {
            address: address.to_string(),
            reason: format!("port {p:?} is not a number from 0 to 65535"),
        }),
    }
}

/// `host:port`, bracketing an IPv6 host.
pub(crate) fn join(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let r = |a: &str, p: &str| resolve_address(a, p);
        assert_eq!(r("10.0.0.1", "22"), Ok(("10.0.0.1".into(), 22)));
        assert_eq!(r("10.0.0.1", "ssh"), Ok(("10.0.0.1".into(), 22)));
        assert_eq!(r("10.0.0.1", "2222"), Ok(("10.0.0.1".into(), 2222)));
        assert_eq!(r("10.0.0.1:23", "2222"), Ok(("10.0.0.1".into(), 23)));
        assert_eq!(r("host.example", "2222"), Ok(("host.example".into(), 2222)));
        assert_eq!(r("::1", "22"), Ok(("::1".into(), 22)));
        assert_eq!(r("[::1]:2200", "22"), Ok(("::1".into(), 2200)));
        assert_eq!(r("[::1]", "24"), Ok(("::1".into(), 24)));
        assert_eq!(r("", "22"), Err(SshError::NoAddress));
        assert!(matches!(r("h:x", "22"), Err(SshError::BadAddress { .. })));
        assert!(matches!(r("h", "99999"), Err(SshError::BadAddress { .. })));
        assert!(matches!(r(":22", "22"), Err(SshError::BadAddress { .. })));
        assert_eq!(join("::1", 22), "[::1]:22");
        assert_eq!(join("h", 22), "h:22");
    }
}
