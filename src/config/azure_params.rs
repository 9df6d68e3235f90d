//! The Azure driver's `DriverParameters` (reference-workers.md §6.3), parsed and validated in
//! one place: `check-config` reports the same errors that the driver's setup would.
//!
//! Keys: `SubscriptionID`, `ClientID`, `ClientSecret`, `TenantID`, `ResourceGroup`, `Location`,
//! `Network`, `Subnet` and `AdminUsername` (required; `TenantID` may be left out when
//! `TokenEndpoint` is set), `CloudEnvironment` (default `AzurePublicCloud`),
//! `ImageResourceGroup` and `NetworkResourceGroup` (default: `ResourceGroup`), `StorageAccount`
//! and `BlobContainer` (both or neither), `SharedImageGalleryName` and
//! `SharedImageGalleryImageVersion` (both or neither), `DeleteDanglingResourcesAfter` (a Go
//! duration, default 20 s), and two overrides that are not in Go, for tests against a local
//! server: `ManagementEndpoint` (the ARM base URL) and `TokenEndpoint` (the OAuth2 token URL).
//! Other keys are ignored, as Go ignores them.
//!
//! Invariant: errors name the key path, never a credential's value; `Debug` redacts the client
//! secret.

use std::fmt;
use std::time::Duration;

use super::ConfigError;
use super::units::parse_duration;

/// `DeleteDanglingResourcesAfter` when unset.
pub const DEFAULT_DELETE_DANGLING_AFTER: Duration = Duration::from_secs(20);

/// The keys that must be set (non-empty). `TenantID` is checked separately.
pub const REQUIRED_KEYS: &[&str] = &[
    "SubscriptionID",
    "ClientID",
    "ClientSecret",
    "ResourceGroup",
    "Location",
    "Network",
    "Subnet",
    "AdminUsername",
];

/// The endpoints of one Azure cloud (Go's `azure.Environment`, the parts the driver uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloudEnvironment {
    /// The `CloudEnvironment` name.
    pub name: &'static str,
    /// The Resource Manager base URL, with a trailing slash; also the token's resource.
    pub resource_manager: &'static str,
    /// The Active Directory (login) base URL, with a trailing slash.
    pub active_directory: &'static str,
    /// The storage DNS suffix (`blob.<suffix>`).
    pub storage_suffix: &'static str,
}

/// The clouds Go's SDK knows by name.
pub const CLOUD_ENVIRONMENTS: &[CloudEnvironment] = &[
    CloudEnvironment {
        name: "AzurePublicCloud",
        resource_manager: "https://management.azure.com/",
        active_directory: "https://login.microsoftonline.com/",
        storage_suffix: "core.windows.net",
    },
    CloudEnvironment {
        name: "AzureUSGovernmentCloud",
        resource_manager: "https://management.usgovcloudapi.net/",
        active_directory: "https://login.microsoftonline.us/",
        storage_suffix: "core.usgovcloudapi.net",
    },
    CloudEnvironment {
        name: "AzureChinaCloud",
        resource_manager: "https://management.chinacloudapi.cn/",
        active_directory: "https://login.chinacloudapi.cn/",
        storage_suffix: "core.chinacloudapi.cn",
    },
    CloudEnvironment {
        name: "AzureGermanCloud",
        resource_manager: "https://management.microsoftazure.de/",
        active_directory: "https://login.microsoftonline.de/",
        storage_suffix: "core.cloudapi.de",
    },
];

/// The Azure driver's parameters, with defaults applied.
#[derive(Clone, PartialEq)]
pub struct AzureParams {
    /// `SubscriptionID`.
    pub subscription_id: String,
    /// `ClientID` (the service principal's application ID).
    pub client_id: String,
    /// `ClientSecret` (secret).
    pub client_secret: String,
    /// `TenantID` ("" only when `TokenEndpoint` is set).
    pub tenant_id: String,
    /// `CloudEnvironment`, resolved.
    pub cloud_environment: CloudEnvironment,
    /// `ResourceGroup`: where VMs and NICs live.
    pub resource_group: String,
    /// `ImageResourceGroup` (default `ResourceGroup`).
    pub image_resource_group: String,
    /// `Location`.
    pub location: String,
    /// `Network`: the virtual network's name.
    pub network: String,
    /// `NetworkResourceGroup` (default `ResourceGroup`).
    pub network_resource_group: String,
    /// `Subnet`.
    pub subnet: String,
    /// `StorageAccount` (for the deprecated VHD images; "" for none).
    pub storage_account: String,
    /// `BlobContainer` (for the deprecated VHD images; "" for none).
    pub blob_container: String,
    /// `SharedImageGalleryName` ("" for managed images).
    pub shared_image_gallery_name: String,
    /// `SharedImageGalleryImageVersion` ("" for managed images).
    pub shared_image_gallery_image_version: String,
    /// `DeleteDanglingResourcesAfter`.
    pub delete_dangling_resources_after: Duration,
    /// `AdminUsername`: the VMs' SSH user.
    pub admin_username: String,
    /// The ARM base URL without a trailing slash (`ManagementEndpoint`, else the environment's).
    pub management_endpoint: String,
    /// The OAuth2 token URL (`TokenEndpoint`, else
    /// `<active directory><TenantID>/oauth2/v2.0/token`).
    pub token_endpoint: String,
}

impl fmt::Debug for AzureParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureParams")
            .field("subscription_id", &self.subscription_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("tenant_id", &self.tenant_id)
            .field("cloud_environment", &self.cloud_environment.name)
            .field("resource_group", &self.resource_group)
            .field("image_resource_group", &self.image_resource_group)
            .field("location", &self.location)
            .field("network", &self.network)
            .field("network_resource_group", &self.network_resource_group)
            .field("subnet", &self.subnet)
            .field("storage_account", &self.storage_account)
            .field("blob_container", &self.blob_container)
            .field("shared_image_gallery_name", &self.shared_image_gallery_name)
            .field(
                "shared_image_gallery_image_version",
                &self.shared_image_gallery_image_version,
            )
            .field(
                "delete_dangling_resources_after",
                &self.delete_dangling_resources_after,
            )
            .field("admin_username", &self.admin_username)
            .field("management_endpoint", &self.management_endpoint)
            .field("token_endpoint", &self.token_endpoint)
            .finish()
    }
}

/// The JSON type name of `v`, for messages that must not show the value.
fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "a mapping",
    }
}

/// Whether the value of `key` may appear in a message.
fn shown(key: &str) -> bool {
    key != "ClientSecret"
}

impl AzureParams {
    /// Parses the DriverParameters object `v`; `path` is its dotted key path (such as
    /// `Clusters.zzzzz.Containers.CloudVMs.DriverParameters`), used in error messages.
    pub fn from_driver_parameters(path: &str, v: &serde_json::Value) -> Result<Self, ConfigError> {
        let empty = serde_json::Map::new();
        let obj = match v {
            serde_json::Value::Null => &empty,
            serde_json::Value::Object(o) => o,
            other => {
                return Err(ConfigError::invalid(
                    path,
                    format!("expected a mapping, got {}", kind(other)),
                ));
            }
        };
        let key_path = |k: &str| format!("{path}.{k}");
        let string = |k: &str| -> Result<String, ConfigError> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(String::new()),
                Some(serde_json::Value::String(s)) => Ok(s.trim().to_string()),
                Some(other) => {
                    let value = if shown(k) {
                        format!(" ({other})")
                    } else {
                        String::new()
                    };
                    Err(ConfigError::invalid(
                        key_path(k),
                        format!("expected a string, got {}{value}", kind(other)),
                    ))
                }
            }
        };
        let required = |k: &str| -> Result<String, ConfigError> {
            let s = string(k)?;
            if s.is_empty() {
                return Err(ConfigError::invalid(
                    key_path(k),
                    "required by the azure driver, but not set",
                ));
            }
            Ok(s)
        };
        let url = |k: &str| -> Result<Option<String>, ConfigError> {
            let s = string(k)?;
            if s.is_empty() {
                Ok(None)
            } else if s.starts_with("http://") || s.starts_with("https://") {
                Ok(Some(s))
            } else {
                Err(ConfigError::invalid(
                    key_path(k),
                    format!("expected an http:// or https:// URL, got {s:?}"),
                ))
            }
        };

        let mut fields = std::collections::BTreeMap::new();
        for k in REQUIRED_KEYS {
            fields.insert(*k, required(k)?);
        }
        let token_override = url("TokenEndpoint")?;
        let tenant_id = if token_override.is_some() {
            string("TenantID")?
        } else {
            required("TenantID")?
        };
        let env_name = string("CloudEnvironment")?;
        let env_name = if env_name.is_empty() {
            "AzurePublicCloud".to_string()
        } else {
            env_name
        };
        let cloud_environment = CLOUD_ENVIRONMENTS
            .iter()
            .find(|e| e.name.eq_ignore_ascii_case(&env_name))
            .copied()
            .ok_or_else(|| {
                let names: Vec<&str> = CLOUD_ENVIRONMENTS.iter().map(|e| e.name).collect();
                ConfigError::invalid(
                    key_path("CloudEnvironment"),
                    format!(
                        "unknown cloud environment {env_name:?} (expected one of {})",
                        names.join(", ")
                    ),
                )
            })?;
        let mut take = |k: &str| fields.remove(k).unwrap_or_default();
        let resource_group = take("ResourceGroup");
        let or_rg = |k: &str| -> Result<String, ConfigError> {
            let s = string(k)?;
            Ok(if s.is_empty() {
                resource_group.clone()
            } else {
                s
            })
        };
        let image_resource_group = or_rg("ImageResourceGroup")?;
        let network_resource_group = or_rg("NetworkResourceGroup")?;
        let both_or_neither = |a: &str, b: &str| -> Result<(String, String), ConfigError> {
            let (va, vb) = (string(a)?, string(b)?);
            if va.is_empty() != vb.is_empty() {
                let (set, unset) = if va.is_empty() { (b, a) } else { (a, b) };
                return Err(ConfigError::invalid(
                    key_path(unset),
                    format!("must be set when {set} is set (set both or neither)"),
                ));
            }
            Ok((va, vb))
        };
        let (storage_account, blob_container) = both_or_neither("StorageAccount", "BlobContainer")?;
        let (shared_image_gallery_name, shared_image_gallery_image_version) =
            both_or_neither("SharedImageGalleryName", "SharedImageGalleryImageVersion")?;
        let dangling_path = key_path("DeleteDanglingResourcesAfter");
        let delete_dangling_resources_after = match obj.get("DeleteDanglingResourcesAfter") {
            None | Some(serde_json::Value::Null) => DEFAULT_DELETE_DANGLING_AFTER,
            Some(serde_json::Value::String(s)) if s.trim().is_empty() => {
                DEFAULT_DELETE_DANGLING_AFTER
            }
            Some(serde_json::Value::String(s)) => {
                let ns = parse_duration(s.trim())
                    .map_err(|e| ConfigError::invalid(&dangling_path, format!("{s:?}: {e}")))?;
                let ns = u64::try_from(ns).map_err(|_| {
                    ConfigError::invalid(&dangling_path, format!("must not be negative, got {s:?}"))
                })?;
                Duration::from_nanos(ns)
            }
            // A bare number is nanoseconds, as Go's Duration unmarshals it.
            Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => {
                Duration::from_nanos(n.as_u64().unwrap_or(0))
            }
            Some(other) => {
                return Err(ConfigError::invalid(
                    &dangling_path,
                    format!("expected a duration such as \"20s\", got {other}"),
                ));
            }
        };
        let management_endpoint = url("ManagementEndpoint")?
            .unwrap_or_else(|| cloud_environment.resource_manager.to_string())
            .trim_end_matches('/')
            .to_string();
        let token_endpoint = token_override.unwrap_or_else(|| {
            format!(
                "{}{tenant_id}/oauth2/v2.0/token",
                cloud_environment.active_directory
            )
        });
        Ok(AzureParams {
            subscription_id: take("SubscriptionID"),
            client_id: take("ClientID"),
            client_secret: take("ClientSecret"),
            tenant_id,
            cloud_environment,
            resource_group: resource_group.clone(),
            image_resource_group,
            location: take("Location"),
            network: take("Network"),
            network_resource_group,
            subnet: take("Subnet"),
            storage_account,
            blob_container,
            shared_image_gallery_name,
            shared_image_gallery_image_version,
            delete_dangling_resources_after,
            admin_username: take("AdminUsername"),
            management_endpoint,
            token_endpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "Clusters.zzzzz.Containers.CloudVMs.DriverParameters";
    const SECRET: &str = "s3cr3t-value";

    fn full() -> serde_json::Value {
        serde_json::json!({
            "SubscriptionID": "sub", "ClientID": "cid", "ClientSecret": SECRET,
            "TenantID": "tid", "ResourceGroup": "rg", "Location": "centralus",
            "Network": "net", "Subnet": "sn", "AdminUsername": "crunch",
        })
    }

    fn parse(v: serde_json::Value) -> Result<AzureParams, ConfigError> {
        AzureParams::from_driver_parameters(P, &v)
    }

    #[test]
    fn defaults() {
        let p = parse(full()).expect("parses");
        assert_eq!(p.cloud_environment.name, "AzurePublicCloud");
        assert_eq!(p.image_resource_group, "rg");
        assert_eq!(p.network_resource_group, "rg");
        assert_eq!(p.delete_dangling_resources_after, Duration::from_secs(20));
        assert_eq!(p.management_endpoint, "https://management.azure.com");
        assert_eq!(
            p.token_endpoint,
            "https://login.microsoftonline.com/tid/oauth2/v2.0/token"
        );
        assert!(!format!("{p:?}").contains(SECRET));
    }

    #[test]
    fn every_required_key_is_named() {
        for k in REQUIRED_KEYS.iter().chain(&["TenantID"]) {
            let mut v = full();
            v.as_object_mut().expect("object").remove(*k);
            let msg = parse(v).expect_err(k).to_string();
            assert!(msg.starts_with(&format!("{P}.{k}: ")), "{msg}");
            assert!(!msg.contains(SECRET), "{msg}");
        }
    }

    #[test]
    fn overrides_pairs_and_durations() {
        let mut v = full();
        let o = v.as_object_mut().expect("object");
        o.remove("TenantID");
        o.insert("TokenEndpoint".into(), "http://127.0.0.1:1/token".into());
        o.insert("ManagementEndpoint".into(), "http://127.0.0.1:1/".into());
        o.insert("DeleteDanglingResourcesAfter".into(), "1m30s".into());
        o.insert("CloudEnvironment".into(), "AzureChinaCloud".into());
        let p = parse(v.clone()).expect("parses");
        assert_eq!(p.management_endpoint, "http://127.0.0.1:1");
        assert_eq!(p.token_endpoint, "http://127.0.0.1:1/token");
        assert_eq!(p.delete_dangling_resources_after, Duration::from_secs(90));
        assert_eq!(p.cloud_environment.storage_suffix, "core.chinacloudapi.cn");

        let mut bad = v.clone();
        bad["StorageAccount"] = "acct".into();
        let msg = parse(bad).expect_err("pair").to_string();
        assert!(msg.starts_with(&format!("{P}.BlobContainer: ")), "{msg}");
        let mut bad = v.clone();
        bad["SharedImageGalleryImageVersion"] = "1.0.0".into();
        let msg = parse(bad).expect_err("pair").to_string();
        assert!(
            msg.starts_with(&format!("{P}.SharedImageGalleryName: ")),
            "{msg}"
        );
        let mut bad = v.clone();
        bad["CloudEnvironment"] = "Mars".into();
        assert!(parse(bad).is_err());
        let mut bad = v;
        bad["DeleteDanglingResourcesAfter"] = "soon".into();
        let msg = parse(bad).expect_err("duration").to_string();
        assert!(msg.contains("DeleteDanglingResourcesAfter"), "{msg}");
    }

    #[test]
    fn bad_secret_type_does_not_show_the_value() {
        let mut v = full();
        v["ClientSecret"] = serde_json::json!([SECRET]);
        let msg = parse(v).expect_err("list").to_string();
        assert!(msg.contains("ClientSecret"), "{msg}");
        assert!(!msg.contains(SECRET), "{msg}");
    }
}
