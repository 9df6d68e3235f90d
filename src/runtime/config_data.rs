//! crunch-run's `ConfigData` (reference-workers.md §2.5): the JSON object the dispatcher sends
//! on the stdin of `crunch-run --detach --stdin-config`.
//!
//! It carries the controller's address and the dispatcher's token, so it is rendered here, in
//! the shell, and never logged. `GatewayAuthSecret` is hex(HMAC-SHA256(SystemRootToken, UUID)).
//! `Cluster` is the cluster's config as JSON when `LocalKeepBlobBuffersPerVCPU` > 0 (crunch-run
//! then runs a local keepstore), else `null`, as Go does.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::arvados;
use crate::config::Loaded;
use crate::core::types::InstanceType;

/// Renders ConfigData for one container on one instance.
pub struct Renderer {
    api_host: String,
    token: String,
    insecure: bool,
    buffers_per_vcpu: i64,
    cluster: Value,
    ec2: bool,
}

impl fmt::Debug for Renderer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Renderer")
            .field("api_host", &self.api_host)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Renderer {
    /// A renderer for the cluster of `loaded`, whose controller `api` talks to. `cluster` is
    /// the cluster's config as JSON (sent only when LocalKeepBlobBuffersPerVCPU > 0).
    pub fn new(loaded: &Loaded, api: &arvados::Client, cluster: Option<Value>) -> Renderer {
        Renderer::for_host(loaded, api.api_host(), api.insecure(), cluster)
    }

    /// A renderer for the cluster of `loaded` whose controller is at `api_host` (`host:port`),
    /// for shells whose controller is not an [`arvados::Client`] (the simulated one).
    pub fn for_host(
        loaded: &Loaded,
        api_host: String,
        insecure: bool,
        cluster: Option<Value>,
    ) -> Renderer {
        Renderer {
            api_host,
            token: loaded.secrets.system_root_token.clone(),
            insecure,
            buffers_per_vcpu: loaded.core.containers.local_keep_blob_buffers_per_vcpu,
            cluster: cluster.unwrap_or(Value::Null),
            ec2: loaded.core.cloud_vms.driver == "ec2",
        }
    }

    /// The JSON text for container `uuid` on an instance of type `it` at `address`.
    pub fn render(&self, uuid: &str, it: &InstanceType, address: &str) -> String {
        let mut env = Map::new();
        env.insert("ARVADOS_API_HOST".into(), json!(self.api_host));
        env.insert("ARVADOS_API_TOKEN".into(), json!(self.token));
        env.insert("InstanceType".into(), json!(indented(it)));
        env.insert(
            "GatewayAddress".into(),
            json!(format!("{}:0", host_of(address))),
        );
        env.insert(
            "GatewayAuthSecret".into(),
            json!(gateway_auth_secret(&self.token, uuid)),
        );
        if self.insecure {
            env.insert("ARVADOS_API_HOST_INSECURE".into(), json!("1"));
        }
        let local_keep = self.buffers_per_vcpu > 0;
        let doc = json!({
            "Env": env,
            "KeepBuffers": if local_keep { self.buffers_per_vcpu * it.vcpus } else { 0 },
            "Cluster": if local_keep { self.cluster.clone() } else { Value::Null },
            "EC2SpotCheck": self.ec2 && it.preemptible,
        });
        doc.to_string()
    }
}

/// The instance type as Go's `json.MarshalIndent(it, "", "    ")` plus a newline.
fn indented(it: &InstanceType) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    if it.serialize(&mut ser).is_err() {
        return "{}\n".into();
    }
    let mut s = String::from_utf8(out).unwrap_or_default();
    s.push('\n');
    s
}

/// The host part of `host`, `host:port`, `[v6]:port` or a bare IPv6 address.
pub fn host_of(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        // A bare IPv6 address has more than one colon and no brackets.
        Some((host, _)) if !host.contains(':') => host,
        _ => address,
    }
}

/// hex(HMAC-SHA256(key = token, message = container UUID)).
pub fn gateway_auth_secret(token: &str, uuid: &str) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(token.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(uuid.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_ports_and_brackets() {
        assert_eq!(host_of("10.0.0.1:2222"), "10.0.0.1");
        assert_eq!(host_of("10.0.0.1"), "10.0.0.1");
        assert_eq!(host_of("[fe80::1]:22"), "fe80::1");
        assert_eq!(host_of("fe80::1"), "fe80::1");
        assert_eq!(host_of("worker.example"), "worker.example");
    }

    #[test]
    fn gateway_secret_is_the_rfc4231_hmac() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            gateway_auth_secret("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn instance_type_is_indented_with_four_spaces_and_a_newline() {
        let it = InstanceType {
            name: "small".into(),
            provider_type: "m5.large".into(),
            vcpus: 2,
            ..InstanceType::default()
        };
        let s = indented(&it);
        assert!(
            s.starts_with("{\n    \"ProviderType\": \"m5.large\""),
            "{s}"
        );
        assert!(s.ends_with("}\n"));
        assert!(!s.contains("small"), "Name is excluded: {s}");
    }
}
