//! Loading the Arvados cluster configuration (`/etc/arvados/config.yml`).
//!
//! [`load_file`] and [`load_str`] read the YAML, find the one cluster under `Clusters`, and return
//! a [`Loaded`]: the validated [`crate::core::Config`] the core runs on, plus what only the
//! adapters need (the secrets, the controller URL, the listen address, the raw DriverParameters,
//! the InstanceSetID) and the warnings an operator should see.
//!
//! The current layout and the legacy one of the old install guide are both read (see the
//! `cluster` module); keys of other Arvados services are accepted silently, unknown keys of the
//! dispatcher's own sections produce warnings, and malformed values are errors that name the full
//! key path and the value.
//!
//! Invariant: no secret (SystemRootToken, ManagementToken, the dispatcher's private key, anything
//! under DriverParameters) ever appears in a [`ConfigError`], in [`Loaded::warnings`], or in the
//! `Debug` output of [`Secrets`] or [`Loaded`].

use std::fmt;
use std::path::{Path, PathBuf};

pub mod azure_params;
mod cluster;
pub mod ec2_params;
mod host;
pub mod quota_group;
mod tree;
pub mod units;

/// Where Arvados keeps the cluster config.
pub const DEFAULT_PATH: &str = "/etc/arvados/config.yml";

/// Why a config could not be loaded. Messages name the file or the key path and the value, except
/// for secret keys, whose values are never shown.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not YAML.
    #[error("{origin}: invalid YAML: {message}")]
    Yaml {
        /// The file (or other source) name.
        origin: String,
        /// The parser's message, with the line and column.
        message: String,
    },
    /// A key has a bad value, or the config as a whole is unusable.
    #[error("{}", if path.is_empty() { message.clone() } else { format!("{path}: {message}") })]
    Invalid {
        /// The dotted key path, such as `Clusters.zzzzz.InstanceTypes.x1md.RAM` (may be empty when
        /// the message names the problem by itself).
        path: String,
        /// What is wrong, with the value unless the key is secret.
        message: String,
    },
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] for `path`.
    pub(crate) fn invalid(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The secrets the adapters need. They never enter the core, and `Debug` redacts them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// `SystemRootToken`: the dispatcher's API token (also the gateway-auth HMAC key).
    pub system_root_token: String,
    /// `ManagementToken`: guards the management API and metrics ("" disables them).
    pub management_token: String,
    /// `Containers.DispatchPrivateKey`: a literal PEM key, or `file:///abs/path`, as written.
    pub dispatch_private_key: String,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("system_root_token", &"<redacted>")
            .field("management_token", &"<redacted>")
            .field("dispatch_private_key", &"<redacted>")
            .finish()
    }
}

/// A loaded and validated cluster config.
#[derive(Clone)]
pub struct Loaded {
    /// The cluster ID: the `Clusters` key, or `ClusterID` if set.
    pub cluster_id: String,
    /// What the core runs on.
    pub core: crate::core::Config,
    /// Tokens and the SSH private key.
    pub secrets: Secrets,
    /// `Services.Controller.ExternalURL`, else its first InternalURL.
    pub controller_url: Option<String>,
    /// `TLS.Insecure`: skip TLS verification of the controller.
    pub tls_insecure: bool,
    /// Where the dispatcher listens, as written: the first `Services.DispatchCloud.InternalURLs`
    /// key (such as `http://host:9006/`) or its `ListenURL`, else a legacy
    /// `NodeProfiles.*.arvados-dispatch-cloud.Listen` (such as `:9006`). See
    /// [`Loaded::listen_host_port`].
    pub listen: Option<String>,
    /// `Containers.CloudVMs.DriverParameters` as given (an object, empty if unset). It holds cloud
    /// credentials: never print it.
    pub driver_parameters: serde_json::Value,
    /// The tag value that marks this dispatcher's VMs (reference-workers.md §4.1). Not secret.
    pub instance_set_id: String,
    /// Problems worth telling the operator that do not stop the dispatcher, one sentence each.
    pub warnings: Vec<String>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("cluster_id", &self.cluster_id)
            .field("core", &self.core)
            .field("secrets", &self.secrets)
            .field("controller_url", &self.controller_url)
            .field("tls_insecure", &self.tls_insecure)
            .field("listen", &self.listen)
            .field("driver_parameters", &"<redacted>")
            .field("instance_set_id", &self.instance_set_id)
            .field("warnings", &self.warnings)
            .finish()
    }
}

impl Loaded {
    /// The listen address as `host:port` (or `:port`), for binding. See [`host_port`].
    pub fn listen_host_port(&self) -> Option<String> {
        self.listen.as_deref().and_then(host_port)
    }
}

/// Turns a listen address into `host:port`: `http://host:9006/` gives `host:9006`,
/// `https://host/` gives `host:443`, and a bare `:9006` or `host:9006` is returned as is. `None`
/// for a URL with no host, or with no port and a scheme other than http or https.
pub fn host_port(listen: &str) -> Option<String> {
    let Some((scheme, rest)) = listen.split_once("://") else {
        return if listen.is_empty() {
            None
        } else {
            Some(listen.to_string())
        };
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return None;
    }
    // The port follows the last colon, except inside an IPv6 literal.
    let has_port = match host.rfind(']') {
        Some(close) => host[close + 1..].starts_with(':'),
        None => host.contains(':'),
    };
    if has_port {
        return Some(host.to_string());
    }
    let port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    Some(format!("{host}:{port}"))
}

/// The InstanceSetID for a SystemRootToken: `<uuid>` for a `v2/<uuid>/<secret>` token, else the
/// hex MD5 of the token (reference-workers.md §4.1).
pub fn instance_set_id(system_root_token: &str) -> String {
    cluster::instance_set_id(system_root_token)
}

/// Validates `loaded`'s `DriverParameters` as its driver will parse them, for `check-config`:
/// a missing required key (EC2 `Region`, Azure `SubscriptionID` ...) is an error naming
/// `Clusters.<id>.Containers.CloudVMs.DriverParameters.<Key>`. The loopback driver's are
/// checked when it starts.
pub fn check_driver_parameters(loaded: &Loaded) -> Result<(), ConfigError> {
    let path = format!(
        "Clusters.{}.Containers.CloudVMs.DriverParameters",
        loaded.cluster_id
    );
    match loaded.core.cloud_vms.driver.as_str() {
        "ec2" => ec2_params::Ec2Params::from_driver_parameters(&path, &loaded.driver_parameters)
            .map(drop),
        "azure" => {
            azure_params::AzureParams::from_driver_parameters(&path, &loaded.driver_parameters)
                .map(drop)
        }
        _ => Ok(()),
    }
}

/// Reads and validates the config file at `path`.
pub fn load_file(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(&text, &path.display().to_string())
}

/// Reads and validates config text. `origin` names the source (usually the file path) in messages.
pub fn load_str(text: &str, origin: &str) -> Result<Loaded, ConfigError> {
    let yaml_error = |e: serde_yaml::Error| ConfigError::Yaml {
        origin: origin.to_string(),
        message: e.to_string(),
    };
    let mut root: serde_yaml::Value = serde_yaml::from_str(text).map_err(yaml_error)?;
    // YAML merge keys (`<<: *anchor`) work in Arvados (go-yaml), so they work here.
    root.apply_merge().map_err(yaml_error)?;
    cluster::load(&root, origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_table() {
        let table: &[(&str, Option<&str>)] = &[
            ("http://host:9006/", Some("host:9006")),
            ("http://host:9006", Some("host:9006")),
            ("https://host.example/", Some("host.example:443")),
            ("http://host.example", Some("host.example:80")),
            ("http://[::1]:9006/", Some("[::1]:9006")),
            ("http://[::1]/", Some("[::1]:80")),
            ("http://user@host:1/x", Some("host:1")),
            (":9006", Some(":9006")),
            ("localhost:9006", Some("localhost:9006")),
            ("http:///", None),
            ("ftp://host/", None),
            ("", None),
        ];
        for (input, want) in table {
            assert_eq!(host_port(input).as_deref(), *want, "host_port({input:?})");
        }
    }

    #[test]
    fn instance_set_id_forms() {
        assert_eq!(
            instance_set_id("v2/zzzzz-gj3su-000000000000000/secret"),
            "zzzzz-gj3su-000000000000000"
        );
        assert_eq!(instance_set_id("xyzzy"), "1271ed5ef305aadabc605b1609e24c52");
        assert_eq!(instance_set_id(""), "d41d8cd98f00b204e9800998ecf8427e");
        // Not exactly three parts: hashed.
        assert_eq!(instance_set_id("v2/a/b/c").len(), 32);
    }

    #[test]
    fn debug_redacts_secrets() {
        let s = Secrets {
            system_root_token: "tok3n".into(),
            management_token: "mgmt".into(),
            dispatch_private_key: "-----BEGIN".into(),
        };
        let text = format!("{s:?}");
        assert!(
            !text.contains("tok3n") && !text.contains("mgmt") && !text.contains("BEGIN"),
            "{text}"
        );
    }
}
