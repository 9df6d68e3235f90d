//! The Azure driver (reference-workers.md §6.3): a small hand-written Azure Resource Manager
//! (ARM) REST client on reqwest (rustls over ring) and serde_json, limited to what the driver
//! needs. The legacy `azure_mgmt_*` crates are not used (see docs/drivers.md).
//!
//! * Authentication: an OAuth2 client-credentials token (`ClientID`/`ClientSecret`) from the
//!   tenant's token endpoint (or `TokenEndpoint`), cached until five minutes before it expires,
//!   fetched again once after a 401.
//! * `create`: the NIC `<name>-nic` (one IP configuration `ip1`, dynamic private IP, the tags plus
//!   `created-at`), then the VM `<name>` (size = ProviderType, the NIC as primary, OS disk
//!   `<name>-os` from a managed image, a shared-gallery image version or a VHD URI, password
//!   login disabled, the public key in `/home/<AdminUsername>/.ssh/authorized_keys`, custom data
//!   = base64 of `#!/bin/sh\n<init>\n`, Spot with eviction policy Delete and MaxPrice −1 for a
//!   preemptible type). Names are `compute-<InstanceSetID>-<15 random [a-z0-9]>`. When the VM
//!   fails, its NIC (and the VM and OS disk, if the VM was accepted) are deleted in the
//!   background.
//! * `list`: the resource group's NICs, then its VMs, both paged on `nextLink`; each VM whose
//!   tags contain the filter is joined with its first NIC for the address. A NIC named
//!   `compute-…` that carries the filter's tags, is attached to no VM and whose `created-at` is
//!   older than `DeleteDanglingResourcesAfter` is deleted in the background (at most
//!   [`MAX_CLEANUPS`] at a time).
//! * `destroy`: GET the VM (404 is NotFound), DELETE it and wait, then DELETE its NICs and its
//!   managed OS disk (404s ignored; failures are logged, since the VM is gone).
//! * `set_tags`: PATCH the VM with the full tag map (ARM replaces the tags).
//! * Long-running operations are polled through `Azure-AsyncOperation` (until `Succeeded`,
//!   `Failed` or `Canceled`) or `Location` (until not 202), every `Retry-After` seconds (default
//!   [`DEFAULT_POLL_INTERVAL`]), at most [`MAX_POLLS`] times.
//! * Errors are classified by [`classify`]: 429 or a `Retry-After` header gives `RateLimited`
//!   (Retry-After as seconds or an HTTP date, else now + 20 s; Go panics on a 429 without the
//!   header), capacity codes give `Capacity(InstanceType)`, `(?i)exceed|quota|limit` in the code
//!   or message gives `Quota`, 404 `NotFound`, 408 and 5xx and network failures `Transient`,
//!   anything else `Permanent`.
//!
//! Differences from Go: instance IDs are the VM's ARM resource ID in lower case (ARM IDs are
//! case-insensitive and ARM does not always echo the case it was given, so create and list
//! agree); `destroy` deletes the NIC and OS disk itself instead of leaving them to a collector;
//! there is no 5-minute blob/disk collector; the tag filter is applied by the driver.
//!
//! Invariant: the client secret and the access token go only into the token request's body and
//! the `Authorization` header; every message built from a response is scrubbed of both, and
//! `Debug` redacts them. Polling and paging URLs are followed only on the management endpoint's
//! own origin, so the token is never sent elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

use super::{
    BoxFuture, CapacityScope, CloudError, CloudErrorKind, CreateRequest, InstanceInfo, InstanceSet,
    cloud_error,
};
use crate::config::ConfigError;
pub use crate::config::azure_params::AzureParams;
use crate::core::time::Timestamp;

/// The `api-version` of Microsoft.Compute virtual machines.
pub const COMPUTE_API_VERSION: &str = "2024-07-01";
/// The `api-version` of Microsoft.Compute managed disks.
pub const DISK_API_VERSION: &str = "2024-03-02";
/// The `api-version` of Microsoft.Network network interfaces.
pub const NETWORK_API_VERSION: &str = "2024-05-01";
/// The tag holding the creation time (RFC 3339), on the VM and the NIC.
pub const CREATED_AT_TAG: &str = "created-at";
/// The prefix of every resource name.
pub const NAME_PREFIX: &str = "compute-";
/// The retry delay of a rate-limit error without a usable `Retry-After` (Go: 20 s).
pub const DEFAULT_RATE_LIMIT_BACKOFF: Duration = Duration::from_secs(20);
/// The poll interval of a long-running operation without `Retry-After`.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// The longest poll interval honoured.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// The most polls of one long-running operation.
pub const MAX_POLLS: usize = 720;
/// The most pages of one listing.
pub const MAX_PAGES: usize = 1000;
/// The most background deletions in flight.
pub const MAX_CLEANUPS: usize = 4;
/// The per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A token is fetched again this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);
/// The longest provider message kept in an error.
const MAX_MESSAGE: usize = 600;
/// ARM error codes that mean no capacity for the requested size.
pub const CAPACITY_CODES: &[&str] = &[
    "SkuNotAvailable",
    "AllocationFailed",
    "ZonalAllocationFailed",
    "OverconstrainedAllocationRequest",
    "OverconstrainedZonalAllocationRequest",
];

/// The clock used for `RateLimited.retry_at` and `created-at` (milliseconds since the Unix
/// epoch).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// An Azure driver setup failure.
#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    /// A DriverParameters value is wrong.
    #[error(transparent)]
    Params(#[from] ConfigError),
    /// The HTTP client could not be built.
    #[error("azure driver: cannot build the HTTP client: {0}")]
    Client(String),
}

/// Classifies an ARM failure: `status` is the HTTP status (None for a failed long-running
/// operation reported with 200), `retry_after` the `Retry-After` header, `code` and `message`
/// the ARM error body's, `now` the current time.
pub fn classify(
    status: Option<u16>,
    retry_after: Option<&str>,
    code: &str,
    message: &str,
    now: Timestamp,
) -> CloudErrorKind {
    if status == Some(429) || retry_after.is_some() {
        let retry_at = retry_after
            .and_then(|v| parse_retry_after(v, now))
            .unwrap_or(now + DEFAULT_RATE_LIMIT_BACKOFF);
        return CloudErrorKind::RateLimited { retry_at };
    }
    if CAPACITY_CODES.iter().any(|c| c.eq_ignore_ascii_case(code)) {
        return CloudErrorKind::Capacity(CapacityScope::InstanceType);
    }
    let quota = |s: &str| {
        let s = s.to_ascii_lowercase();
        s.contains("exceed") || s.contains("quota") || s.contains("limit")
    };
    if quota(code) || quota(message) {
        return CloudErrorKind::Quota;
    }
    match status {
        Some(404) => CloudErrorKind::NotFound,
        Some(408) => CloudErrorKind::Transient,
        Some(s) if s >= 500 => CloudErrorKind::Transient,
        Some(_) => CloudErrorKind::Permanent,
        None if code.eq_ignore_ascii_case("NotFound")
            || code.eq_ignore_ascii_case("ResourceNotFound") =>
        {
            CloudErrorKind::NotFound
        }
        None if code.contains("Internal") || code.contains("Timeout") || code.is_empty() => {
            CloudErrorKind::Transient
        }
        None => CloudErrorKind::Permanent,
    }
}

/// Parses a `Retry-After` value: whole seconds, or an HTTP date (`Sun, 06 Nov 1994 08:49:37
/// GMT`).
pub fn parse_retry_after(v: &str, now: Timestamp) -> Option<Timestamp> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(now + Duration::from_secs(secs));
    }
    parse_http_date(v).map(Timestamp)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Milliseconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_http_date(v: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let parts: Vec<&str> = v.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let d: i64 = day.parse().ok()?;
    let m = MONTHS.iter().position(|x| x.eq_ignore_ascii_case(month))? as i64 + 1;
    let y: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, mi, s] = hms.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&d) || *h > 23 || *mi > 59 || *s > 60 {
        return None;
    }
    let secs = days_from_civil(y, m, d) * 86_400 + h * 3600 + mi * 60 + s;
    u64::try_from(secs).ok().map(|s| s * 1000)
}

/// RFC 3339 in UTC with trailing zeros of the fraction dropped, as Go's `RFC3339Nano` writes.
pub fn format_rfc3339(t: Timestamp) -> String {
    let ms = t.0;
    let secs = (ms / 1000) as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    let mut s = format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    let frac = ms % 1000;
    if frac != 0 {
        let f = format!("{frac:03}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Milliseconds since the epoch of an RFC 3339 time (`2006-01-02T15:04:05.999999999Z07:00`).
pub fn parse_rfc3339(v: &str) -> Option<u64> {
    let v = v.trim();
    let (date, rest) = v.split_once(['T', 't'])?;
    let dp: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [y, mo, d] = dp.as_slice() else {
        return None;
    };
    let zone_at = rest.find(['Z', 'z', '+', '-'])?;
    let (clock, zone) = rest.split_at(zone_at);
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let tp: Vec<i64> = hms
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, mi, s] = tp.as_slice() else {
        return None;
    };
    let mut ms = 0;
    for (i, c) in frac.chars().take(3).enumerate() {
        ms += i64::from(c.to_digit(10)?) * [100, 10, 1][i];
    }
    let offset = if zone.eq_ignore_ascii_case("z") {
        0
    } else {
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let (oh, om) = zone[1..].split_once(':')?;
        sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
    };
    let secs = days_from_civil(*y, *mo, *d) * 86_400 + h * 3600 + mi * 60 + s - offset;
    u64::try_from(secs * 1000 + ms).ok()
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `application/x-www-form-urlencoded` of `pairs`.
fn form_encode(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        let mut o = String::new();
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    o.push(b as char)
                }
                b' ' => o.push('+'),
                _ => o.push_str(&format!("%{b:02X}")),
            }
        }
        o
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The TLS configuration: rustls over ring with the system's root certificates.
fn tls_config() -> Result<rustls::ClientConfig, AzureError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AzureError::Client(format!("TLS protocol versions: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "error loading a system root certificate");
    }
    roots.add_parsable_certificates(native.certs);
    let mut cfg = builder.with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A cached access token.
struct Token {
    value: String,
    refresh_at: Instant,
}

/// A response read in full.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The shared state of the driver and its background deletions.
struct Inner {
    params: AzureParams,
    http: reqwest::Client,
    clock: Clock,
    instance_set_id: Option<String>,
    token: tokio::sync::Mutex<Option<Token>>,
    /// Resource IDs (lower case) being deleted in the background.
    cleanups: Mutex<BTreeSet<String>>,
    /// The management endpoint's origin (`scheme://host:port`).
    origin: String,
}

/// The Azure instance set.
#[derive(Clone)]
pub struct Azure {
    inner: Arc<Inner>,
}

impl fmt::Debug for Azure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Azure")
            .field("params", &self.inner.params)
            .field("instance_set_id", &self.inner.instance_set_id)
            .finish_non_exhaustive()
    }
}

/// Fifteen random characters from `[a-z0-9]` (std's per-hasher random keys; names need to be
/// unique, not secret).
fn random_suffix() -> String {
    const A: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let mut n = u128::from(h.finish());
    let mut h2 = std::collections::hash_map::RandomState::new().build_hasher();
    h2.write_u64(h.finish());
    n = (n << 64) | u128::from(h2.finish());
    (0..15)
        .map(|_| {
            let c = A[(n % 36) as usize] as char;
            n /= 36;
            c
        })
        .collect()
}

/// The `(code, message)` of an ARM error body (`{"error":{"code","message"}}`), or of an
/// OAuth2 error (`{"error":"…","error_description":"…"}`).
fn error_fields(body: &Value) -> (String, String) {
    let e = body.get("error").unwrap_or(body);
    if let Some(code) = e.as_str() {
        let msg = body
            .get("error_description")
            .and_then(Value::as_str)
            .unwrap_or_default();
        return (code.to_string(), msg.to_string());
    }
    let s = |k: &str| {
        e.get(k)
            .or_else(|| e.get(k.to_ascii_uppercase()))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (code, mut message) = (s("code"), s("message"));
    // Details often carry the specific reason (such as the quota message).
    if let Some(details) = e.get("details").and_then(Value::as_array) {
        for d in details.iter().take(3) {
            if let Some(m) = d.get("message").and_then(Value::as_str) {
                message.push_str(" (");
                message.push_str(m);
                message.push(')');
            }
        }
    }
    (code, message)
}

/// `s` cut to at most [`MAX_MESSAGE`] bytes on a character boundary.
fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Whether `tags` contains every entry of `filter`.
fn matches(tags: &BTreeMap<String, String>, filter: &BTreeMap<String, String>) -> bool {
    filter.iter().all(|(k, v)| tags.get(k) == Some(v))
}

/// The string map of a JSON `tags` object (non-string values are skipped).
fn tags_of(v: &Value) -> BTreeMap<String, String> {
    v.get("tags")
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// The string at a JSON pointer, or "".
fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The first private IP address of a NIC.
fn nic_address(nic: &Value) -> String {
    nic.pointer("/properties/ipConfigurations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| str_at(c, "/properties/privateIPAddress"))
        .find(|a| !a.is_empty())
        .unwrap_or_default()
        .to_string()
}

/// Checks that `id` looks like an ARM resource ID, so that it can be put in a URL path.
fn check_id(id: &str) -> Result<(), CloudError> {
    let ok = id.starts_with("/subscriptions/")
        && !id.contains("..")
        && !id.contains("//")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.()".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(cloud_error(
            CloudErrorKind::NotFound,
            format!("azure: {id:?} is not a virtual machine resource ID"),
        ))
    }
}

impl Azure {
    /// A driver from DriverParameters `params` (see [`AzureParams`]). `instance_set_id` names
    /// the resources (`compute-<id>-…`); when None, it is taken from the `…InstanceSetID` tag of
    /// each create.
    pub fn from_driver_parameters(
        params: &Value,
        instance_set_id: Option<String>,
    ) -> Result<Azure, AzureError> {
        let p = AzureParams::from_driver_parameters("DriverParameters", params)?;
        Azure::new(p, instance_set_id, Arc::new(crate::runtime::wall_clock))
    }

    /// A driver with explicit parameters and clock.
    pub fn new(
        params: AzureParams,
        instance_set_id: Option<String>,
        clock: Clock,
    ) -> Result<Azure, AzureError> {
        let url = Url::parse(&params.management_endpoint).map_err(|e| {
            AzureError::Client(format!(
                "management endpoint {:?}: {e}",
                params.management_endpoint
            ))
        })?;
        let origin = url.origin().ascii_serialization();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config()?)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| AzureError::Client(e.to_string()))?;
        Ok(Azure {
            inner: Arc::new(Inner {
                params,
                http,
                clock,
                instance_set_id,
                token: tokio::sync::Mutex::new(None),
                cleanups: Mutex::new(BTreeSet::new()),
                origin,
            }),
        })
    }

    /// The parameters in use.
    pub fn params(&self) -> &AzureParams {
        &self.inner.params
    }
}

impl Inner {
    /// `s` with the client secret and the cached token replaced.
    fn scrub(&self, s: String, token: Option<&str>) -> String {
        let mut s = s;
        for secret in [Some(self.params.client_secret.as_str()), token]
            .into_iter()
            .flatten()
        {
            if secret.len() >= 4 && s.contains(secret) {
                s = s.replace(secret, "<redacted>");
            }
        }
        truncate(s)
    }

    fn now(&self) -> Timestamp {
        (self.clock)()
    }

    /// `<endpoint>/subscriptions/<sub>/resourceGroups/<rg>/providers/<provider>/<name>`.
    fn resource_path(&self, rg: &str, provider: &str, name: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{rg}/providers/{provider}/{name}",
            self.params.subscription_id
        )
    }

    fn url(&self, path: &str, api_version: &str) -> String {
        format!(
            "{}{path}?api-version={api_version}",
            self.params.management_endpoint
        )
    }

    /// A transport failure as a `CloudError` (Transient; reqwest's message names the URL, never
    /// a header).
    fn transport_error(&self, what: &str, e: &reqwest::Error) -> CloudError {
        let mut msg = format!("azure {what}: {e}");
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        cloud_error(CloudErrorKind::Transient, self.scrub(msg, None))
    }

    /// The error of a failed reply.
    fn reply_error(&self, what: &str, r: &Reply, token: Option<&str>) -> CloudError {
        let (code, message) = error_fields(&r.body);
        let retry_after = r.header(RETRY_AFTER.as_str());
        let kind = classify(
            Some(r.status.as_u16()),
            retry_after,
            &code,
            &message,
            self.now(),
        );
        let text = format!(
            "azure {what}: HTTP {}: {code}: {message}",
            r.status.as_u16()
        );
        cloud_error(kind, self.scrub(text, token))
    }

    /// A token, fetched if there is none or it is about to expire.
    async fn token(&self) -> Result<String, CloudError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let scope = format!("{}.default", self.params.cloud_environment.resource_manager);
        let body = form_encode(&[
            ("grant_type", "client_credentials"),
            ("client_id", &self.params.client_id),
            ("client_secret", &self.params.client_secret),
            ("scope", &scope),
        ]);
        let what = format!("token request to {}", self.params.token_endpoint);
        let resp = self
            .http
            .post(&self.params.token_endpoint)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(&what, &e))?;
        let reply = self.read(resp, &what).await?;
        if !reply.status.is_success() {
            return Err(self.reply_error(&what, &reply, None));
        }
        let value = reply
            .body
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                cloud_error(
                    CloudErrorKind::Permanent,
                    format!("azure {what}: the response has no access_token"),
                )
            })?
            .to_string();
        // Version 1 endpoints send expires_in as a string, version 2 as a number.
        let expires_in = match reply.body.get("expires_in") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or(3600);
        let life = Duration::from_secs(expires_in);
        let refresh_at = Instant::now() + life.saturating_sub(TOKEN_MARGIN).max(life / 2);
        *cached = Some(Token {
            value: value.clone(),
            refresh_at,
        });
        Ok(value)
    }

    /// Reads a response's body as JSON (`null` when empty or not JSON).
    async fn read(&self, resp: reqwest::Response, what: &str) -> Result<Reply, CloudError> {
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(what, &e))?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Sends an authorised request to an absolute URL on the management endpoint and reads the
    /// reply. A 401 fetches a new token and retries once. Error statuses become errors.
    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Reply, CloudError> {
        let parsed = Url::parse(url).map_err(|e| {
            cloud_error(
                CloudErrorKind::Permanent,
                format!("azure {what}: bad URL {url:?}: {e}"),
            )
        })?;
        if parsed.origin().ascii_serialization() != self.origin {
            return Err(cloud_error(
                CloudErrorKind::Permanent,
                format!(
                    "azure {what}: refusing to follow {url:?}, which is not on the management endpoint {}",
                    self.origin
                ),
            ));
        }
        for attempt in 0..2 {
            let token = self.token().await?;
            let mut req = self
                .http
                .request(method.clone(), parsed.clone())
                .header(AUTHORIZATION, format!("Bearer {token}"));
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| self.transport_error(what, &e))?;
            let reply = self.read(resp, what).await?;
            if reply.status == StatusCode::UNAUTHORIZED && attempt == 0 {
                *self.token.lock().await = None;
                continue;
            }
            if reply.status.is_client_error() || reply.status.is_server_error() {
                return Err(self.reply_error(what, &reply, Some(&token)));
            }
            return Ok(reply);
        }
        Err(cloud_error(
            CloudErrorKind::Permanent,
            format!("azure {what}: unauthorised after fetching a new token"),
        ))
    }

    /// The poll interval a reply asks for.
    fn poll_interval(r: &Reply) -> Duration {
        r.header(RETRY_AFTER.as_str())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_POLL_INTERVAL, Duration::from_secs)
            .min(MAX_POLL_INTERVAL)
    }

    /// Waits for the long-running operation `r` started, if any.
    async fn wait(&self, r: &Reply, what: &str) -> Result<(), CloudError> {
        if let Some(op) = r.header("azure-asyncoperation").map(str::to_string) {
            let mut interval = Self::poll_interval(r);
            for _ in 0..MAX_POLLS {
                tokio::time::sleep(interval).await;
                let p = self.call(Method::GET, &op, None, what).await?;
                match str_at(&p.body, "/status") {
                    s if s.eq_ignore_ascii_case("Succeeded") => return Ok(()),
                    s if s.eq_ignore_ascii_case("Failed") || s.eq_ignore_ascii_case("Canceled") => {
                        let (code, message) = error_fields(&p.body);
                        let kind = classify(None, None, &code, &message, self.now());
                        let text = format!("azure {what}: operation {s}: {code}: {message}");
                        return Err(cloud_error(kind, self.scrub(text, None)));
                    }
                    _ => interval = Self::poll_interval(&p),
                }
            }
            return Err(cloud_error(
                CloudErrorKind::Transient,
                format!("azure {what}: still running after {MAX_POLLS} polls"),
            ));
        }
        if r.status == StatusCode::ACCEPTED
            && let Some(loc) = r.header("location").map(str::to_string)
        {
            let mut interval = Self::poll_interval(r);
            for _ in 0..MAX_POLLS {
                tokio::time::sleep(interval).await;
                let p = self.call(Method::GET, &loc, None, what).await?;
                if p.status != StatusCode::ACCEPTED {
                    return Ok(());
                }
                interval = Self::poll_interval(&p);
            }
            return Err(cloud_error(
                CloudErrorKind::Transient,
                format!("azure {what}: still running after {MAX_POLLS} polls"),
            ));
        }
        Ok(())
    }

    /// PUTs `body` at `path`, waits for the operation and returns the resource (GET again
    /// after a long-running operation).
    async fn put(
        &self,
        path: &str,
        api: &str,
        body: &Value,
        what: &str,
    ) -> Result<Value, CloudError> {
        let url = self.url(path, api);
        let r = self.call(Method::PUT, &url, Some(body), what).await?;
        let long = r.header("azure-asyncoperation").is_some() || r.status == StatusCode::ACCEPTED;
        self.wait(&r, what).await?;
        if long {
            Ok(self.call(Method::GET, &url, None, what).await?.body)
        } else {
            Ok(r.body)
        }
    }

    /// DELETEs `path` and waits. `Ok(false)` if it did not exist (404 or 204).
    async fn delete(&self, path: &str, api: &str, what: &str) -> Result<bool, CloudError> {
        let url = self.url(path, api);
        match self.call(Method::DELETE, &url, None, what).await {
            Ok(r) => {
                let existed = r.status != StatusCode::NO_CONTENT;
                self.wait(&r, what).await?;
                Ok(existed)
            }
            Err(e) if e.kind == CloudErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every item of a paged listing.
    async fn list_all(&self, path: &str, api: &str, what: &str) -> Result<Vec<Value>, CloudError> {
        let mut url = self.url(path, api);
        let mut items = Vec::new();
        for _ in 0..MAX_PAGES {
            let r = self.call(Method::GET, &url, None, what).await?;
            if let Some(v) = r.body.get("value").and_then(Value::as_array) {
                items.extend(v.iter().cloned());
            }
            match r.body.get("nextLink").and_then(Value::as_str) {
                Some(next) if !next.is_empty() => url = next.to_string(),
                _ => return Ok(items),
            }
        }
        Err(cloud_error(
            CloudErrorKind::Transient,
            format!("azure {what}: more than {MAX_PAGES} pages"),
        ))
    }

    /// Deletes the resources at `paths` in order in a background task, unless one of them is
    /// already being deleted or [`MAX_CLEANUPS`] deletions are in flight. `paths` hold
    /// `(path, api-version)`.
    fn cleanup(self: &Arc<Self>, paths: Vec<(String, &'static str)>, why: &'static str) {
        let Some(key) = paths.first().map(|(p, _)| p.to_ascii_lowercase()) else {
            return;
        };
        {
            let mut set = self
                .cleanups
                .lock()
                .expect("cleanup set lock is never poisoned");
            if set.len() >= MAX_CLEANUPS || !set.insert(key.clone()) {
                return;
            }
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            for (path, api) in &paths {
                let what = format!("delete {path}");
                match me.delete(path, api, &what).await {
                    Ok(_) => tracing::info!(resource = %path, reason = why, "azure: deleted"),
                    Err(e) => {
                        tracing::warn!(resource = %path, reason = why, error = %e, "azure: delete failed")
                    }
                }
            }
            me.cleanups
                .lock()
                .expect("cleanup set lock is never poisoned")
                .remove(&key);
        });
    }

    /// The instance set ID for resource names.
    fn set_id(&self, tags: &BTreeMap<String, String>) -> Option<String> {
        self.instance_set_id.clone().or_else(|| {
            tags.iter()
                .find(|(k, _)| k.ends_with("InstanceSetID"))
                .map(|(_, v)| v.clone())
        })
    }

    /// The OS disk and image reference of the VM named `name` for image `image_id`.
    fn storage_profile(&self, name: &str, image_id: &str) -> Result<Value, CloudError> {
        let p = &self.params;
        let disk_name = format!("{name}-os");
        if image_id.starts_with("http://") || image_id.starts_with("https://") {
            if p.blob_container.is_empty() {
                return Err(cloud_error(
                    CloudErrorKind::Permanent,
                    format!(
                        "azure: ImageID {image_id:?} is a VHD URI, which needs StorageAccount and BlobContainer in DriverParameters"
                    ),
                ));
            }
            tracing::warn!(image = %image_id, "azure: VHD images are deprecated; use a managed or shared gallery image");
            let vhd = format!(
                "https://{}.blob.{}/{}/{disk_name}.vhd",
                p.storage_account, p.cloud_environment.storage_suffix, p.blob_container
            );
            return Ok(json!({
                "osDisk": {
                    "osType": "Linux",
                    "name": disk_name,
                    "createOption": "FromImage",
                    "image": {"uri": image_id},
                    "vhd": {"uri": vhd},
                }
            }));
        }
        let image = if p.shared_image_gallery_name.is_empty() {
            self.resource_path(
                &p.image_resource_group,
                "Microsoft.Compute/images",
                image_id,
            )
        } else {
            self.resource_path(
                &p.image_resource_group,
                "Microsoft.Compute/galleries",
                &format!(
                    "{}/images/{image_id}/versions/{}",
                    p.shared_image_gallery_name, p.shared_image_gallery_image_version
                ),
            )
        };
        Ok(json!({
            "imageReference": {"id": image},
            "osDisk": {
                "osType": "Linux",
                "name": disk_name,
                "createOption": "FromImage",
            }
        }))
    }

    async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<InstanceInfo, CloudError> {
        let p = &self.params;
        let it = &req.instance_type;
        if it.added_scratch > 0 {
            return Err(cloud_error(
                CloudErrorKind::Permanent,
                format!(
                    "azure: instance type {:?} has AddedScratch {}, which the azure driver does not support",
                    it.name, it.added_scratch
                ),
            ));
        }
        let name = match self.set_id(&req.tags) {
            Some(id) => format!("{NAME_PREFIX}{id}-{}", random_suffix()),
            None => format!("{NAME_PREFIX}{}", random_suffix()),
        };
        let mut tags = req.tags.clone();
        tags.insert(CREATED_AT_TAG.to_string(), format_rfc3339(self.now()));

        let nic_path = self.resource_path(
            &p.resource_group,
            "Microsoft.Network/networkInterfaces",
            &format!("{name}-nic"),
        );
        let subnet = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/virtualnetworks/{}/subnets/{}",
            p.subscription_id, p.network_resource_group, p.network, p.subnet
        );
        let nic_body = json!({
            "location": p.location,
            "tags": tags,
            "properties": {
                "ipConfigurations": [{
                    "name": "ip1",
                    "properties": {
                        "subnet": {"id": subnet},
                        "privateIPAllocationMethod": "Dynamic",
                    }
                }]
            }
        });
        let nic = self
            .put(
                &nic_path,
                NETWORK_API_VERSION,
                &nic_body,
                &format!("create network interface {name}-nic"),
            )
            .await?;
        let nic_id = match str_at(&nic, "/id") {
            "" => nic_path.clone(),
            id => id.to_string(),
        };

        let storage = match self.storage_profile(&name, &req.image_id) {
            Ok(s) => s,
            Err(e) => {
                self.cleanup(vec![(nic_path, NETWORK_API_VERSION)], "image error");
                return Err(e);
            }
        };
        let custom_data = base64(format!("#!/bin/sh\n{}\n", req.init_command).as_bytes());
        let mut linux = json!({"disablePasswordAuthentication": true});
        if let Some(key) = &req.public_key {
            let key_data = key.to_openssh().map_err(|e| {
                cloud_error(
                    CloudErrorKind::Permanent,
                    format!("azure: cannot encode the public key: {e}"),
                )
            })?;
            linux["ssh"] = json!({"publicKeys": [{
                "path": format!("/home/{}/.ssh/authorized_keys", p.admin_username),
                "keyData": key_data,
            }]});
        }
        let mut properties = json!({
            "hardwareProfile": {"vmSize": it.provider_type},
            "storageProfile": storage,
            "networkProfile": {"networkInterfaces": [{"id": nic_id, "properties": {"primary": true}}]},
            "osProfile": {
                "computerName": name,
                "adminUsername": p.admin_username,
                "customData": custom_data,
                "linuxConfiguration": linux,
            },
        });
        if it.preemptible {
            properties["priority"] = json!("Spot");
            properties["evictionPolicy"] = json!("Delete");
            properties["billingProfile"] = json!({"maxPrice": -1});
        }
        let vm_body = json!({"location": p.location, "tags": tags, "properties": properties});
        let vm_path = self.resource_path(
            &p.resource_group,
            "Microsoft.Compute/virtualMachines",
            &name,
        );
        let vm_url = self.url(&vm_path, COMPUTE_API_VERSION);
        let what = format!("create virtual machine {name}");
        let accepted = match self.call(Method::PUT, &vm_url, Some(&vm_body), &what).await {
            Ok(r) => r,
            Err(e) => {
                self.cleanup(
                    vec![(nic_path, NETWORK_API_VERSION)],
                    "virtual machine create failed",
                );
                return Err(e);
            }
        };
        if let Err(e) = self.wait(&accepted, &what).await {
            let disk_path = self.resource_path(
                &p.resource_group,
                "Microsoft.Compute/disks",
                &format!("{name}-os"),
            );
            self.cleanup(
                vec![
                    (vm_path, COMPUTE_API_VERSION),
                    (nic_path, NETWORK_API_VERSION),
                    (disk_path, DISK_API_VERSION),
                ],
                "virtual machine create failed",
            );
            return Err(e);
        }
        let id = match str_at(&accepted.body, "/id") {
            "" => vm_path,
            id => id.to_string(),
        };
        Ok(InstanceInfo {
            id: id.to_ascii_lowercase(),
            address: nic_address(&nic),
            provider_type: it.provider_type.clone(),
            tags,
            remote_user: p.admin_username.clone(),
            ..InstanceInfo::default()
        })
    }

    async fn list(
        self: &Arc<Self>,
        filter: &BTreeMap<String, String>,
    ) -> Result<Vec<InstanceInfo>, CloudError> {
        let p = &self.params;
        let nics = self
            .list_all(
                &self.resource_path(&p.resource_group, "Microsoft.Network", "networkInterfaces"),
                NETWORK_API_VERSION,
                "list network interfaces",
            )
            .await?;
        let now_ms = self.now().0;
        let dangling_ms = p.delete_dangling_resources_after.as_millis() as u64;
        let mut addresses = BTreeMap::new();
        for nic in &nics {
            let id = str_at(nic, "/id").to_ascii_lowercase();
            let name = str_at(nic, "/name");
            if nic.pointer("/properties/virtualMachine/id").is_some() {
                addresses.insert(id, nic_address(nic));
                continue;
            }
            let tags = tags_of(nic);
            let old = tags
                .get(CREATED_AT_TAG)
                .and_then(|t| parse_rfc3339(t))
                .is_some_and(|t| now_ms.saturating_sub(t) > dangling_ms);
            if name.starts_with(NAME_PREFIX) && !filter.is_empty() && matches(&tags, filter) && old
            {
                let path = match str_at(nic, "/id") {
                    "" => self.resource_path(
                        &p.resource_group,
                        "Microsoft.Network/networkInterfaces",
                        name,
                    ),
                    id => id.to_string(),
                };
                self.cleanup(
                    vec![(path, NETWORK_API_VERSION)],
                    "dangling network interface",
                );
            }
        }
        let vms = self
            .list_all(
                &self.resource_path(&p.resource_group, "Microsoft.Compute", "virtualMachines"),
                COMPUTE_API_VERSION,
                "list virtual machines",
            )
            .await?;
        let mut out = Vec::new();
        for vm in &vms {
            let tags = tags_of(vm);
            if !matches(&tags, filter) {
                continue;
            }
            let nic = vm
                .pointer("/properties/networkProfile/networkInterfaces/0/id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_ascii_lowercase();
            out.push(InstanceInfo {
                id: str_at(vm, "/id").to_ascii_lowercase(),
                address: addresses.get(&nic).cloned().unwrap_or_default(),
                provider_type: str_at(vm, "/properties/hardwareProfile/vmSize").to_string(),
                tags,
                remote_user: p.admin_username.clone(),
                ..InstanceInfo::default()
            });
        }
        Ok(out)
    }

    async fn destroy(&self, id: &str) -> Result<(), CloudError> {
        check_id(id)?;
        let url = self.url(id, COMPUTE_API_VERSION);
        let what = format!("destroy {id}");
        let vm = self.call(Method::GET, &url, None, &what).await?.body;
        let r = self.call(Method::DELETE, &url, None, &what).await?;
        if r.status == StatusCode::NO_CONTENT {
            return Err(cloud_error(
                CloudErrorKind::NotFound,
                format!("azure {what}: the virtual machine does not exist"),
            ));
        }
        self.wait(&r, &what).await?;
        let mut leftovers: Vec<(String, &str)> = vm
            .pointer("/properties/networkProfile/networkInterfaces")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|n| n.get("id").and_then(Value::as_str))
            .map(|n| (n.to_string(), NETWORK_API_VERSION))
            .collect();
        let disk = str_at(&vm, "/properties/storageProfile/osDisk/managedDisk/id");
        if !disk.is_empty() {
            leftovers.push((disk.to_string(), DISK_API_VERSION));
        }
        for (path, api) in leftovers {
            if check_id(&path).is_err() {
                continue;
            }
            let what = format!("delete {path}");
            if let Err(e) = self.delete(&path, api, &what).await {
                tracing::warn!(resource = %path, error = %e, "azure: could not delete a destroyed VM's resource");
            }
        }
        Ok(())
    }

    async fn set_tags(&self, id: &str, tags: BTreeMap<String, String>) -> Result<(), CloudError> {
        check_id(id)?;
        let url = self.url(id, COMPUTE_API_VERSION);
        let what = format!("set tags of {id}");
        let r = self
            .call(Method::PATCH, &url, Some(&json!({"tags": tags})), &what)
            .await?;
        self.wait(&r, &what).await
    }
}

impl InstanceSet for Azure {
    fn create<'a>(&'a self, req: CreateRequest) -> BoxFuture<'a, Result<InstanceInfo, CloudError>> {
        Box::pin(async move { self.inner.create(req).await })
    }

    fn list<'a>(
        &'a self,
        filter: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<InstanceInfo>, CloudError>> {
        Box::pin(async move { self.inner.list(filter).await })
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(async move { self.inner.destroy(id).await })
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(async move { self.inner.set_tags(id, tags).await })
    }

    fn stop<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp(1_700_000_000_000);

    #[test]
    fn classification_table() {
        use CloudErrorKind::*;
        let rl = |s| RateLimited { retry_at: s };
        // (HTTP status, Retry-After, code, message, expected kind).
        type Row<'a> = (
            Option<u16>,
            Option<&'a str>,
            &'a str,
            &'a str,
            CloudErrorKind,
        );
        let table: &[Row] = &[
            (
                Some(429),
                Some("7"),
                "",
                "",
                rl(NOW + Duration::from_secs(7)),
            ),
            (
                Some(429),
                None,
                "TooManyRequests",
                "",
                rl(NOW + DEFAULT_RATE_LIMIT_BACKOFF),
            ),
            (
                Some(429),
                Some("soon"),
                "",
                "",
                rl(NOW + DEFAULT_RATE_LIMIT_BACKOFF),
            ),
            (
                Some(503),
                Some("Wed, 21 Oct 2015 07:28:00 GMT"),
                "",
                "",
                rl(Timestamp(1_445_412_480_000)),
            ),
            (
                Some(409),
                None,
                "OperationNotAllowed",
                "Operation could not be completed as it results in exceeding approved standardDSv3Family Cores quota.",
                Quota,
            ),
            (Some(409), None, "QuotaExceeded", "", Quota),
            (
                Some(409),
                None,
                "SkuNotAvailable",
                "The requested size is not available",
                Capacity(CapacityScope::InstanceType),
            ),
            (
                None,
                None,
                "AllocationFailed",
                "Allocation failed.",
                Capacity(CapacityScope::InstanceType),
            ),
            (
                None,
                None,
                "ZonalAllocationFailed",
                "",
                Capacity(CapacityScope::InstanceType),
            ),
            (
                Some(404),
                None,
                "ResourceNotFound",
                "The Resource was not found.",
                NotFound,
            ),
            (Some(500), None, "InternalServerError", "", Transient),
            (Some(408), None, "", "", Transient),
            (Some(400), None, "InvalidParameter", "bad", Permanent),
            (None, None, "InternalExecutionError", "", Transient),
            (None, None, "VMExtensionProvisioningError", "", Permanent),
        ];
        for (status, ra, code, msg, want) in table {
            assert_eq!(
                classify(*status, *ra, code, msg, NOW),
                *want,
                "{status:?} {ra:?} {code}"
            );
        }
    }

    #[test]
    fn time_formats_round_trip() {
        assert_eq!(format_rfc3339(Timestamp(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_rfc3339(Timestamp(1_700_000_000_120)),
            "2023-11-14T22:13:20.12Z"
        );
        for ms in [0, 1_700_000_000_120, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(
                parse_rfc3339(&format_rfc3339(Timestamp(ms))),
                Some(ms),
                "{ms}"
            );
        }
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20.123456789+01:00"),
            Some(1_700_000_000_123)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777_000)
        );
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
    }

    #[test]
    fn base64_and_form() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"#!/bin/sh\n"), "IyEvYmluL3NoCg==");
        assert_eq!(form_encode(&[("a b", "x/y+z&=")]), "a+b=x%2Fy%2Bz%26%3D");
    }

    #[test]
    fn names_are_random_and_well_formed() {
        let (a, b) = (random_suffix(), random_suffix());
        assert_ne!(a, b);
        assert_eq!(a.len(), 15);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(
            check_id(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"
            )
            .is_ok()
        );
        for bad in [
            "vm",
            "/subscriptions/../x",
            "/subscriptions/s?x=1",
            "https://evil/subscriptions/",
        ] {
            assert_eq!(
                check_id(bad).unwrap_err().kind,
                CloudErrorKind::NotFound,
                "{bad}"
            );
        }
    }
}
