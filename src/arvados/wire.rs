//! Wire shapes of the controller API and their conversion into the core's types.
//!
//! The controller sends container records as JSON with RFC 3339 timestamps; the core keeps
//! milliseconds since the Unix epoch. Conversion never panics: a malformed timestamp or field is
//! an error that names the container and the value.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::core::Timestamp;
use crate::core::command::ContainerUpdate;
use crate::core::key::Key;
use crate::core::types::{
    Container, ContainerState, Mount, RuntimeConstraints, SchedulingParameters,
};

/// The fields every container list request selects (reference-scheduler.md §4.2).
pub const POLL_SELECT: [&str; 7] = [
    "uuid",
    "state",
    "priority",
    "runtime_constraints",
    "container_image",
    "scheduling_parameters",
    "created_at",
];

/// One page of `GET arvados/v1/containers`.
#[derive(Clone, Debug, Deserialize)]
pub struct ContainerList {
    /// The records of this page.
    #[serde(default)]
    pub items: Vec<WireContainer>,
    /// The total match count, absent with `count=none`.
    #[serde(default)]
    pub items_available: Option<i64>,
}

/// A container record as the controller sends it. Every field is optional because `select`
/// restricts what comes back.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireContainer {
    /// UUID.
    pub uuid: String,
    /// State.
    pub state: Option<ContainerState>,
    /// Priority.
    pub priority: Option<i64>,
    /// Resource constraints.
    pub runtime_constraints: Option<RuntimeConstraints>,
    /// Image PDH.
    pub container_image: Option<String>,
    /// Scheduling parameters.
    pub scheduling_parameters: Option<SchedulingParameters>,
    /// RFC 3339 creation time.
    pub created_at: Option<String>,
    /// Lock holder token UUID (null when unlocked).
    pub locked_by_uuid: Option<String>,
    /// Mounts, kept raw so that a malformed field is reported per container.
    pub mounts: Option<serde_json::Value>,
}

/// Why a record could not be converted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// `created_at` is not an RFC 3339 time at or after 1970.
    #[error("container {uuid}: created_at {value:?} is not an RFC 3339 time: {reason}")]
    CreatedAt {
        /// Container.
        uuid: String,
        /// The text received.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A response lacks a field the request needs.
    #[error("container {uuid:?}: response has no {field}")]
    Missing {
        /// Container.
        uuid: String,
        /// The missing field.
        field: &'static str,
    },
}

impl WireContainer {
    /// The core's record (without mounts).
    pub fn to_container(&self) -> Result<Container, WireError> {
        let created_at =
            match &self.created_at {
                None => Timestamp::ZERO,
                Some(s) if s.is_empty() => Timestamp::ZERO,
                Some(s) => parse_rfc3339_millis(s).map(Timestamp).map_err(|reason| {
                    WireError::CreatedAt {
                        uuid: self.uuid.clone(),
                        value: s.clone(),
                        reason,
                    }
                })?,
            };
        Ok(Container {
            uuid: Key::from(&self.uuid),
            state: self.state.unwrap_or_default(),
            priority: self.priority.unwrap_or(0),
            runtime_constraints: self.runtime_constraints.clone().unwrap_or_default(),
            container_image: self.container_image.clone().unwrap_or_default(),
            scheduling_parameters: self.scheduling_parameters.clone().unwrap_or_default(),
            created_at,
            locked_by_uuid: self.locked_by_uuid.clone().filter(|s| !s.is_empty()),
            mounts: None,
        })
    }

    /// The fields a lock, unlock or cancel response carries for the core.
    pub fn to_update(&self) -> Result<ContainerUpdate, WireError> {
        let state = self.state.ok_or_else(|| WireError::Missing {
            uuid: self.uuid.clone(),
            field: "state",
        })?;
        Ok(ContainerUpdate {
            state,
            priority: self.priority.unwrap_or(0),
            locked_by_uuid: self.locked_by_uuid.clone().filter(|s| !s.is_empty()),
        })
    }
}

/// Decodes a `mounts` value. The error text starts with `json: cannot unmarshal`, the phrase
/// the core (like Go's dispatcher) treats as an invalid record to cancel as unsatisfiable.
pub fn decode_mounts(uuid: &str, v: &serde_json::Value) -> Result<BTreeMap<String, Mount>, String> {
    if v.is_null() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_value::<BTreeMap<String, Mount>>(v.clone())
        .map_err(|e| format!("json: cannot unmarshal mounts of container {uuid}: {e}"))
}

/// The `errors` array of an error response, joined, or a short excerpt of a body that is not
/// an Arvados error document.
pub fn error_message(body: &str) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        errors: Vec<String>,
        #[serde(default)]
        error_token: Option<String>,
    }
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(b) if !b.errors.is_empty() => {
            let mut m = b.errors.join("; ");
            if let Some(t) = b.error_token.filter(|t| !t.is_empty()) {
                m.push_str(&format!(" (error_token {t})"));
            }
            m
        }
        _ => {
            let trimmed = body.trim();
            if trimmed.is_empty() {
                "empty response body".to_string()
            } else {
                let cut: String = trimmed.chars().take(200).collect();
                format!("response body: {cut}")
            }
        }
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn digits(s: &[u8], from: usize, n: usize) -> Result<i64, &'static str> {
    let part = s.get(from..from + n).ok_or("too short")?;
    let mut v = 0i64;
    for &b in part {
        if !b.is_ascii_digit() {
            return Err("expected a digit");
        }
        v = v * 10 + i64::from(b - b'0');
    }
    Ok(v)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` into milliseconds since the Unix epoch.
pub fn parse_rfc3339_millis(s: &str) -> Result<u64, &'static str> {
    let b = s.as_bytes();
    let (year, month, day) = (digits(b, 0, 4)?, digits(b, 5, 2)?, digits(b, 8, 2)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return Err("expected YYYY-MM-DD");
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return Err("expected T between date and time");
    }
    let (hour, min, sec) = (digits(b, 11, 2)?, digits(b, 14, 2)?, digits(b, 17, 2)?);
    if b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
        return Err("expected HH:MM:SS");
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return Err("field out of range");
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err("empty fraction");
        }
        for _ in (i - start)..3 {
            millis *= 10;
        }
    }
    let offset_secs = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let off = digits(b, i + 1, 2)? * 3600 + digits(b, i + 4, 2)? * 60;
            if sign == b'+' { off } else { -off }
        }
        _ => return Err("expected Z or a ±HH:MM offset at the end"),
    };
    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec - offset_secs;
    let ms = secs
        .checked_mul(1000)
        .and_then(|v| v.checked_add(millis))
        .ok_or("out of range")?;
    u64::try_from(ms).map_err(|_| "before 1970")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses_the_controller_format() {
        assert_eq!(parse_rfc3339_millis("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_rfc3339_millis("2016-12-01T02:44:16.123456789Z"),
            Ok(1_480_560_256_123)
        );
        assert_eq!(
            parse_rfc3339_millis("2016-12-01T04:44:16.5+02:00"),
            Ok(1_480_560_256_500)
        );
        assert!(parse_rfc3339_millis("1969-12-31T23:59:59Z").is_err());
        assert!(parse_rfc3339_millis("2016-13-01T00:00:00Z").is_err());
        assert!(parse_rfc3339_millis("yesterday").is_err());
        assert!(parse_rfc3339_millis("2016-12-01T02:44:16").is_err());
    }

    #[test]
    fn error_bodies_become_messages() {
        assert_eq!(
            error_message(r#"{"errors":["cannot lock when Running"],"error_token":"123+abc"}"#),
            "cannot lock when Running (error_token 123+abc)"
        );
        assert_eq!(
            error_message("<html>bad gateway</html>"),
            "response body: <html>bad gateway</html>"
        );
        assert_eq!(error_message(""), "empty response body");
    }

    #[test]
    fn bad_mounts_name_the_go_phrase() {
        let v = serde_json::json!({"/tmp": {"kind": "tmp", "capacity": "lots"}});
        let e = decode_mounts("zzzzz-dz642-000000000000001", &v).unwrap_err();
        assert!(e.starts_with("json: cannot unmarshal"), "{e}");
        let ok = decode_mounts(
            "u",
            &serde_json::json!({"/tmp": {"kind": "tmp", "capacity": 5}}),
        )
        .expect("valid mounts");
        assert_eq!(ok["/tmp"].capacity, 5);
    }
}
