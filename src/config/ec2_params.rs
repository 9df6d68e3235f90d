//! The EC2 driver's `DriverParameters` (reference-workers.md §6.2), parsed and validated in one
//! place: `check-config` reports the same errors that the driver's setup would.
//!
//! Keys: `AccessKeyID`, `SecretAccessKey`, `Region` (required), `SecurityGroupIDs` (a list, or a
//! mapping whose keys are the IDs), `SubnetID` (a string or a list; "", `[]` or a missing value
//! mean none), `AdminUsername`, `EBSVolumeType` (default `gp2`), `EBSPrice` ($/GiB-month),
//! `IAMInstanceProfile`, `SpotPriceUpdateInterval` (a Go duration, default `24h` as Arvados
//! ships it; 0 disables spot price lookups),
//! `InstanceTypeQuotaGroups` (read by the loader, see `quota_group`), and `Endpoint` (an
//! EC2-compatible endpoint URL, for tests against an emulator on loopback). Other keys are
//! ignored, as Go ignores them.
//!
//! Invariant: errors name the key path, never a credential's value; `Debug` redacts the
//! secret access key.

use std::fmt;
use std::time::Duration;

use super::ConfigError;
use super::units::parse_duration;

/// The EBS volume type used when `EBSVolumeType` is unset.
pub const DEFAULT_EBS_VOLUME_TYPE: &str = "gp2";

/// `SpotPriceUpdateInterval` when unset: Arvados' `config.default.yml` value.
pub const DEFAULT_SPOT_PRICE_UPDATE_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// The EC2 driver's parameters.
#[derive(Clone, Default, PartialEq)]
pub struct Ec2Params {
    /// `AccessKeyID` (with `SecretAccessKey` also "": the default AWS credential chain).
    pub access_key_id: String,
    /// `SecretAccessKey` (secret).
    pub secret_access_key: String,
    /// `Region`.
    pub region: String,
    /// `SecurityGroupIDs`, sorted and deduplicated.
    pub security_group_ids: Vec<String>,
    /// `SubnetID`: the subnets to try, in order.
    pub subnet_ids: Vec<String>,
    /// `AdminUsername`: the SSH user of the instances.
    pub admin_username: String,
    /// `EBSVolumeType` of the added scratch volume.
    pub ebs_volume_type: String,
    /// `EBSPrice` in dollars per GiB-month.
    pub ebs_price: f64,
    /// `IAMInstanceProfile` name ("" for none).
    pub iam_instance_profile: String,
    /// `SpotPriceUpdateInterval` (zero disables spot price lookups).
    pub spot_price_update_interval: Duration,
    /// `Endpoint`: an EC2-compatible endpoint URL instead of the regional AWS one.
    pub endpoint: Option<String>,
}

impl fmt::Debug for Ec2Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2Params")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("region", &self.region)
            .field("security_group_ids", &self.security_group_ids)
            .field("subnet_ids", &self.subnet_ids)
            .field("admin_username", &self.admin_username)
            .field("ebs_volume_type", &self.ebs_volume_type)
            .field("ebs_price", &self.ebs_price)
            .field("iam_instance_profile", &self.iam_instance_profile)
            .field(
                "spot_price_update_interval",
                &self.spot_price_update_interval,
            )
            .field("endpoint", &self.endpoint)
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

impl Ec2Params {
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
        // A string value; `show` says whether the value may appear in a message.
        let string = |k: &str, show: bool| -> Result<String, ConfigError> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(String::new()),
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => {
                    let shown = if show {
                        format!(" ({other})")
                    } else {
                        String::new()
                    };
                    Err(ConfigError::invalid(
                        key_path(k),
                        format!("expected a string, got {}{shown}", kind(other)),
                    ))
                }
            }
        };
        let string_list = |k: &str| -> Result<Vec<String>, ConfigError> {
            let bad = |what: &serde_json::Value| {
                ConfigError::invalid(
                    key_path(k),
                    format!(
                        "expected a string or a list of strings, got {} ({what})",
                        kind(what)
                    ),
                )
            };
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(Vec::new()),
                Some(serde_json::Value::String(s)) if s.is_empty() => Ok(Vec::new()),
                Some(serde_json::Value::String(s)) => Ok(vec![s.clone()]),
                Some(serde_json::Value::Array(items)) => items
                    .iter()
                    .map(|i| match i {
                        serde_json::Value::String(s) if !s.is_empty() => Ok(s.clone()),
                        other => Err(bad(other)),
                    })
                    .collect(),
                // A set written as a mapping: its keys are the members (Go's StringSet).
                Some(serde_json::Value::Object(m)) => Ok(m.keys().cloned().collect()),
                Some(other) => Err(bad(other)),
            }
        };

        let region = string("Region", true)?;
        if region.trim().is_empty() {
            return Err(ConfigError::invalid(
                key_path("Region"),
                "the EC2 driver needs a region, such as us-east-1",
            ));
        }
        let mut security_group_ids = string_list("SecurityGroupIDs")?;
        security_group_ids.sort();
        security_group_ids.dedup();
        let subnet_ids = string_list("SubnetID")?;
        let mut ebs_volume_type = string("EBSVolumeType", true)?;
        if ebs_volume_type.is_empty() {
            ebs_volume_type = DEFAULT_EBS_VOLUME_TYPE.to_string();
        }
        let ebs_price = match obj.get("EBSPrice") {
            None | Some(serde_json::Value::Null) => 0.0,
            Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(0.0),
            Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().map_err(|_| {
                ConfigError::invalid(
                    key_path("EBSPrice"),
                    format!("expected a number (dollars per GiB-month), got {s:?}"),
                )
            })?,
            Some(other) => {
                return Err(ConfigError::invalid(
                    key_path("EBSPrice"),
                    format!("expected a number, got {}", kind(other)),
                ));
            }
        };
        if !ebs_price.is_finite() || ebs_price < 0.0 {
            return Err(ConfigError::invalid(
                key_path("EBSPrice"),
                format!("expected a non-negative number, got {ebs_price}"),
            ));
        }
        let spot_price_update_interval = match obj.get("SpotPriceUpdateInterval") {
            None | Some(serde_json::Value::Null) => DEFAULT_SPOT_PRICE_UPDATE_INTERVAL,
            Some(serde_json::Value::String(s)) if s.is_empty() => {
                DEFAULT_SPOT_PRICE_UPDATE_INTERVAL
            }
            Some(serde_json::Value::String(s)) => {
                let ns = parse_duration(s).map_err(|e| {
                    ConfigError::invalid(key_path("SpotPriceUpdateInterval"), e.to_string())
                })?;
                Duration::from_nanos(u64::try_from(ns).map_err(|_| {
                    ConfigError::invalid(
                        key_path("SpotPriceUpdateInterval"),
                        format!("must not be negative, got {s:?}"),
                    )
                })?)
            }
            // A bare number is nanoseconds, as Go's Duration unmarshals it.
            Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => {
                Duration::from_nanos(n.as_u64().unwrap_or(0))
            }
            Some(other) => {
                return Err(ConfigError::invalid(
                    key_path("SpotPriceUpdateInterval"),
                    format!("expected a duration such as \"24h\", got {other}"),
                ));
            }
        };
        let endpoint = string("Endpoint", true)?;
        let endpoint = if endpoint.is_empty() {
            None
        } else if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
            Some(endpoint)
        } else {
            return Err(ConfigError::invalid(
                key_path("Endpoint"),
                format!("expected an http:// or https:// URL, got {endpoint:?}"),
            ));
        };
        Ok(Ec2Params {
            access_key_id: string("AccessKeyID", false)?,
            secret_access_key: string("SecretAccessKey", false)?,
            region,
            security_group_ids,
            subnet_ids,
            admin_username: string("AdminUsername", true)?,
            ebs_volume_type,
            ebs_price,
            iam_instance_profile: string("IAMInstanceProfile", true)?,
            spot_price_update_interval,
            endpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "Clusters.zzzzz.Containers.CloudVMs.DriverParameters";

    fn parse(v: serde_json::Value) -> Result<Ec2Params, ConfigError> {
        Ec2Params::from_driver_parameters(P, &v)
    }

    #[test]
    fn defaults_and_full_set() {
        let p = parse(serde_json::json!({"Region": "us-east-1"})).expect("parses");
        assert_eq!(p.ebs_volume_type, "gp2");
        assert!(p.subnet_ids.is_empty());
        assert_eq!(p.spot_price_update_interval, Duration::from_secs(86400));
        assert_eq!(p.ebs_price, 0.0);
        assert_eq!(p.endpoint, None);
        for off in [
            serde_json::json!("0"),
            serde_json::json!("0s"),
            serde_json::json!(0),
        ] {
            let p = parse(serde_json::json!({"Region": "r", "SpotPriceUpdateInterval": off}))
                .expect("parses");
            assert_eq!(p.spot_price_update_interval, Duration::ZERO, "{off}");
        }
        let p = parse(serde_json::json!({"Region": "r", "SpotPriceUpdateInterval": "90m"}))
            .expect("parses");
        assert_eq!(p.spot_price_update_interval, Duration::from_secs(5400));
        let e = parse(serde_json::json!({"Region": "r", "SpotPriceUpdateInterval": "soon"}))
            .unwrap_err();
        assert!(e.to_string().contains("SpotPriceUpdateInterval"), "{e}");
        let e = parse(serde_json::json!({"Region": "r", "SpotPriceUpdateInterval": "-1h"}))
            .unwrap_err();
        assert!(e.to_string().contains("SpotPriceUpdateInterval"), "{e}");

        let p = parse(serde_json::json!({
            "Region": "us-west-2", "AccessKeyID": "AKID", "SecretAccessKey": "s3cr3t-value",
            "SecurityGroupIDs": {"sg-b": {}, "sg-a": {}}, "SubnetID": ["subnet-1", "subnet-2"],
            "AdminUsername": "crunch", "EBSVolumeType": "gp3", "EBSPrice": 0.1,
            "IAMInstanceProfile": "prof", "SpotPriceUpdateInterval": "24h",
            "Endpoint": "http://127.0.0.1:5000",
        }))
        .expect("parses");
        assert_eq!(p.security_group_ids, ["sg-a", "sg-b"]);
        assert_eq!(p.subnet_ids, ["subnet-1", "subnet-2"]);
        assert_eq!(p.spot_price_update_interval, Duration::from_secs(86400));
        assert_eq!(p.ebs_volume_type, "gp3");
        assert!(!format!("{p:?}").contains("s3cr3t"));
        let p = parse(serde_json::json!({"Region": "r", "SubnetID": "subnet-1"})).expect("parses");
        assert_eq!(p.subnet_ids, ["subnet-1"]);
        let p = parse(serde_json::json!({"Region": "r", "SubnetID": ""})).expect("parses");
        assert!(p.subnet_ids.is_empty());
    }

    #[test]
    fn missing_region_names_the_key() {
        let e = parse(serde_json::json!({"SecretAccessKey": "s3cr3t-value"})).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("{P}.Region: ")), "{msg}");
        assert!(!msg.contains("s3cr3t"), "{msg}");
    }

    #[test]
    fn bad_secret_type_does_not_show_the_value() {
        let e = parse(serde_json::json!({"Region": "r", "SecretAccessKey": ["s3cr3t-value"]}))
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("SecretAccessKey"), "{msg}");
        assert!(!msg.contains("s3cr3t"), "{msg}");
    }
}
