//! crunch-run's `ConfigData`: the JSON the dispatcher writes to `crunch-run --detach
//! --stdin-config` (reference-workers.md §2.5), rendered from the core's
//! `ExecStdin::ConfigData` plus the secrets only the adapter holds.
//!
//! `GatewayAuthSecret` is hex(HMAC-SHA256(key = SystemRootToken, message = container UUID)),
//! computed with the ring SHA-256 that rustls exposes (no extra dependency). Invariant: the
//! rendered text carries the token by design (crunch-run needs it), so it must only ever be
//! written to the runner's stdin, never logged; [`ConfigDataParams`]'s `Debug` redacts it.

use std::fmt;

use serde_json::{Value, json};

use crate::core::types::InstanceType;

/// What goes into one ConfigData document.
pub struct ConfigDataParams<'a> {
    /// The dispatcher client's `APIHost` (`host[:port]`, no scheme).
    pub api_host: &'a str,
    /// The dispatcher's token (`SystemRootToken`).
    pub token: &'a str,
    /// `TLS.Insecure`: adds `ARVADOS_API_HOST_INSECURE=1`.
    pub insecure: bool,
    /// The instance's configured type.
    pub instance_type: &'a InstanceType,
    /// The worker's address, `host`, `host:port`, `[v6]:port` or a bare IPv6 address.
    pub address: &'a str,
    /// Container UUID.
    pub uuid: &'a str,
    /// `Containers.LocalKeepBlobBuffersPerVCPU`.
    pub keep_buffers_per_vcpu: i64,
    /// The full cluster config, sent only when `keep_buffers_per_vcpu > 0`.
    pub cluster: Option<&'a Value>,
    /// `Driver == "ec2" && instance_type.Preemptible`.
    pub ec2_spot_check: bool,
}

impl fmt::Debug for ConfigDataParams<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigDataParams")
            .field("api_host", &self.api_host)
            .field("token", &"[redacted]")
            .field("uuid", &self.uuid)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

fn sha256() -> &'static dyn rustls::crypto::hash::Hash {
    match rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256 {
        rustls::SupportedCipherSuite::Tls13(s) => s.common.hash_provider,
        #[allow(unreachable_patterns)]
        _ => unreachable!("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite"),
    }
}

/// HMAC-SHA256 (RFC 2104) over ring's SHA-256.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 64;
    let h = sha256();
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        let d = h.hash(key);
        k[..d.as_ref().len()].copy_from_slice(d.as_ref());
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = h.start();
    inner.update(&k.map(|b| b ^ 0x36));
    inner.update(message);
    let inner = inner.finish();
    let mut outer = h.start();
    outer.update(&k.map(|b| b ^ 0x5c));
    outer.update(inner.as_ref());
    outer.finish().as_ref().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `GatewayAuthSecret` for a container.
pub fn gateway_auth_secret(token: &str, uuid: &str) -> String {
    hex(&hmac_sha256(token.as_bytes(), uuid.as_bytes()))
}

/// `<host>:0` from a worker address: the port is dropped, a bare IPv6 address is tolerated, and
/// an IPv6 host is bracketed.
pub fn gateway_address(address: &str) -> String {
    let host = if let Some(rest) = address.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else if address.matches(':').count() == 1 {
        address.split_once(':').map_or(address, |(h, _)| h)
    } else {
        address
    };
    if host.contains(':') {
        format!("[{host}]:0")
    } else {
        format!("{host}:0")
    }
}

/// The instance type as Go's `json.MarshalIndent(…, "", "    ")` plus a newline.
pub fn instance_type_json(it: &InstanceType) -> String {
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    match serde::Serialize::serialize(it, &mut ser) {
        Ok(()) => {
            let mut s = String::from_utf8_lossy(&buf).into_owned();
            s.push('\n');
            s
        }
        // Serialising plain numbers and strings cannot fail; keep the document valid anyway.
        Err(_) => "{}\n".to_string(),
    }
}

/// The ConfigData document.
pub fn render(p: &ConfigDataParams<'_>) -> Value {
    let mut env = serde_json::Map::new();
    env.insert("ARVADOS_API_HOST".into(), json!(p.api_host));
    env.insert("ARVADOS_API_TOKEN".into(), json!(p.token));
    env.insert(
        "InstanceType".into(),
        json!(instance_type_json(p.instance_type)),
    );
    env.insert("GatewayAddress".into(), json!(gateway_address(p.address)));
    env.insert(
        "GatewayAuthSecret".into(),
        json!(gateway_auth_secret(p.token, p.uuid)),
    );
    if p.insecure {
        env.insert("ARVADOS_API_HOST_INSECURE".into(), json!("1"));
    }
    let (keep_buffers, cluster) = if p.keep_buffers_per_vcpu > 0 {
        (
            p.keep_buffers_per_vcpu
                .saturating_mul(p.instance_type.vcpus.max(0)),
            p.cluster.cloned().unwrap_or(Value::Null),
        )
    } else {
        (0, Value::Null)
    };
    json!({
        "Env": env,
        "KeepBuffers": keep_buffers,
        "Cluster": cluster,
        "EC2SpotCheck": p.ec2_spot_check,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn gateway_address_drops_the_port() {
        assert_eq!(gateway_address("10.1.2.3:2222"), "10.1.2.3:0");
        assert_eq!(gateway_address("10.1.2.3"), "10.1.2.3:0");
        assert_eq!(gateway_address("[fe80::1]:22"), "[fe80::1]:0");
        assert_eq!(gateway_address("fe80::1"), "[fe80::1]:0");
        assert_eq!(gateway_address("worker.example"), "worker.example:0");
    }

    #[test]
    fn render_follows_the_spec() {
        let it = InstanceType {
            name: "tiny-name".into(),
            provider_type: "t3.small".into(),
            vcpus: 2,
            ram: 2 << 30,
            price: 0.5,
            ..InstanceType::default()
        };
        let cluster = json!({"ClusterID": "zzzzz"});
        let p = ConfigDataParams {
            api_host: "zzzzz.example:443",
            token: "systemroottoken",
            insecure: true,
            instance_type: &it,
            address: "10.0.0.5:22",
            uuid: "zzzzz-dz642-000000000000001",
            keep_buffers_per_vcpu: 1,
            cluster: Some(&cluster),
            ec2_spot_check: false,
        };
        let v = render(&p);
        assert_eq!(v["Env"]["ARVADOS_API_HOST"], "zzzzz.example:443");
        assert_eq!(v["Env"]["ARVADOS_API_HOST_INSECURE"], "1");
        assert_eq!(v["Env"]["GatewayAddress"], "10.0.0.5:0");
        assert_eq!(
            v["Env"]["GatewayAuthSecret"],
            gateway_auth_secret("systemroottoken", "zzzzz-dz642-000000000000001")
        );
        let it_text = v["Env"]["InstanceType"].as_str().expect("string");
        assert!(
            it_text.starts_with("{\n    \"ProviderType\": \"t3.small\",\n    \"VCPUs\": 2,"),
            "{it_text}"
        );
        assert!(it_text.ends_with("}\n"));
        assert!(
            !it_text.contains("tiny-name") && !it_text.contains("\"Name\""),
            "no Name"
        );
        assert!(!it_text.contains("\"Scratch\""), "no Scratch");
        assert_eq!(v["KeepBuffers"], 2);
        assert_eq!(v["Cluster"], cluster);
        let p = ConfigDataParams {
            keep_buffers_per_vcpu: 0,
            insecure: false,
            ..p
        };
        let v = render(&p);
        assert_eq!(v["KeepBuffers"], 0);
        assert!(v["Cluster"].is_null());
        assert!(v["Env"].get("ARVADOS_API_HOST_INSECURE").is_none());
        assert!(!format!("{p:?}").contains("systemroottoken"));
    }
}
