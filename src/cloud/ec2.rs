//! The EC2 driver (reference-workers.md §6.2) on `aws-sdk-ec2`, with a rustls-over-ring HTTP
//! client and SDK retries disabled: the core does its own quota, capacity and rate-limit backoff.
//!
//! * `create` is one `RunInstances` per subnet tried: one network interface without a public IP,
//!   the tags on the instance only, IMDSv2 required, user data `#!/bin/sh\n<init>\n`, an EBS
//!   scratch volume `/dev/xvdt` when the type has AddedScratch, spot with `MaxPrice` for a
//!   preemptible type, and the key pair found by fingerprint or imported. Subnets are tried from
//!   the remembered index, wrapping around, moving on only after a subnet-specific error; the
//!   last tried index is remembered either way.
//! * `list` is `DescribeInstances` with one `tag:<key>` filter per tag, paged on `NextToken` (an
//!   empty token ends the listing), skipping `shutting-down` and `terminated` instances. When
//!   it returns a spot instance and `SpotPriceUpdateInterval` is not zero, the driver also maps
//!   instances to availability zones (`DescribeInstanceStatus`, errors logged and ignored) and
//!   refreshes its spot price history (`DescribeSpotPriceHistory`) for any (type, spot, zone)
//!   key older than the interval; each spot instance is listed with its key's normalised
//!   history in [`InstanceInfo::price_history`] and `EBSPrice` in
//!   [`InstanceInfo::scratch_gib_month_price`], from which the core's run probe sends
//!   `--stdin-prices` (Go's `PriceHistory(type)`: the core knows the type's AddedScratch).
//! * `set_tags` is `CreateTags` with every tag (upsert only); `destroy` is `TerminateInstances`.
//! * Errors are classified by [`classify`] into the core's [`CloudErrorKind`]s. For
//!   `RunInstances` and `DescribeInstances`, a throttling code gives `RateLimited` with a retry
//!   time from a [`Backoff`] (1 s, 2.5 s, 4.75 s, … capped at 60 s; one state for create and one
//!   for list), and any other outcome resets that backoff.
//!
//! Key pairs: an `ImportKeyPair` that fails with `InvalidKeyPair.Duplicate` means the key pair
//! `arvados-dispatch-keypair-<fingerprint>` already exists (another dispatcher, or an emulator
//! that records a different fingerprint than the one searched for), and it is used.
//!
//! Credentials (Go: "static if either key is set; otherwise the SDK default chain"): the static
//! keys `AccessKeyID` and `SecretAccessKey` when both are set (one without the other is a setup
//! error); otherwise `aws-config`'s default chain, in its order: the `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` environment, the shared config and
//! credentials files and their profiles (`AWS_PROFILE`, `AWS_CONFIG_FILE`,
//! `AWS_SHARED_CREDENTIALS_FILE`, `credential_process`, SSO), web identity
//! (`AWS_WEB_IDENTITY_TOKEN_FILE`), ECS container credentials, and the instance role from IMDSv2
//! (`AWS_EC2_METADATA_SERVICE_ENDPOINT` moves it). The chain is built on the first request, not
//! when the driver is constructed, so construction makes no call; it uses the driver's
//! rustls-over-ring HTTP client. The SDK caches what it returns and refreshes it
//! [`CREDENTIALS_EXPIRY_WINDOW`] before it expires. A request that finds no credentials fails
//! with an error saying so, which the core receives like any other failed call.
//!
//! Metrics (reference-workers.md §8), exported through [`InstanceSet::metrics`]:
//! `ec2_instance_starts_total{subnet_id,success}` counts every RunInstances attempt (each
//! subnet of a failover), with series pre-created at 0 for each configured subnet, or for `""`
//! when none is; `ec2_instances{subnet_id}` is the number of instances in the last listing per
//! subnet (the instance's `SubnetId`, `""` for none), always with `""`, every configured subnet
//! and every subnet an earlier listing saw (0 when empty), and absent until the first listing.
//!
//! Invariant: the secret access key (static or from the chain) is given to the SDK's credentials
//! provider and nowhere else; it never appears in an error, a log line, a metric or `Debug`
//! output.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::future::ProvideCredentials as ProvideCredentialsFuture;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::{
    BehaviorVersion, Credentials, IdentityCache, ProvideCredentials, Region, SharedHttpClient,
};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::primitives::{Blob, DateTime};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceLifecycleType, InstanceMarketOptionsRequest,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceNetworkInterfaceSpecification, InstanceStateName, MarketType, ResourceType,
    ShutdownBehavior, SpotMarketOptions, Tag, TagSpecification, VolumeType,
};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use russh::keys::PublicKey;
use russh::keys::ssh_key::HashAlg;
use russh::keys::ssh_key::public::KeyData;

use super::{
    BoxFuture, CapacityScope, CloudError, CloudErrorKind, CreateRequest, InstanceInfo, InstanceSet,
    cloud_error,
};
use crate::config::ConfigError;
pub use crate::config::ec2_params::Ec2Params;
use crate::core::price::normalize_price_history;
use crate::core::time::Timestamp;
use crate::core::types::PricePoint;
use crate::http::metrics::{Family, Kind, PREFIX, Sample, SampleValue};

/// The device name of the added scratch volume.
pub const SCRATCH_DEVICE: &str = "/dev/xvdt";

/// The prefix of the names of imported key pairs; the first fingerprint follows it.
pub const KEY_PAIR_NAME_PREFIX: &str = "arvados-dispatch-keypair-";

/// The `ImportKeyPair` error code for a name that is taken: the key pair is already there.
pub const KEY_PAIR_DUPLICATE: &str = "InvalidKeyPair.Duplicate";

/// The product description of the spot prices looked up.
pub const SPOT_PRODUCT_DESCRIPTION: &str = "Linux/UNIX";

/// How long before they expire cached credentials are refreshed (Go's credential cache expiry
/// window).
pub const CREDENTIALS_EXPIRY_WINDOW: Duration = Duration::from_secs(300);

/// The name of the per-subnet instance gauge, without [`PREFIX`].
pub const METRIC_INSTANCES: &str = "ec2_instances";

/// The name of the RunInstances attempt counter, without [`PREFIX`].
pub const METRIC_INSTANCE_STARTS: &str = "ec2_instance_starts_total";

/// Bytes per GiB, for the scratch volume size.
const GIB: i64 = 1 << 30;

/// The SDK's default set of throttling error codes (the Go driver's throttle table).
pub const THROTTLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

/// The codes that are quota errors.
pub const QUOTA_CODES: &[&str] = &[
    "InstanceLimitExceeded",
    "InsufficientAddressCapacity",
    "InsufficientFreeAddressesInSubnet",
    "InsufficientVolumeCapacity",
    "MaxSpotInstanceCountExceeded",
];

/// Codes that mean "try again later" without any throttling semantics (server-side failures).
const TRANSIENT_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// The clock used for `RateLimited.retry_at` (milliseconds since the Unix epoch).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// What an EC2 error is, before any backoff state is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// A throttling code: rate limited, with a retry time from the backoff.
    Throttle,
    /// An account quota code.
    Quota,
    /// No capacity for the type, its quota group, or anything.
    Capacity(CapacityScope),
    /// The instance does not exist (`InvalidInstanceID.NotFound`). Other `*.NotFound` codes
    /// (an image, subnet or key pair) are configuration errors, hence permanent.
    NotFound,
    /// A server-side or network failure.
    Transient,
    /// Anything else.
    Permanent,
}

/// Classifies an EC2 error by its `code` (None when no service error was parsed, such as a
/// connection failure), `message` and HTTP status.
pub fn classify(code: Option<&str>, message: &str, http_status: Option<u16>) -> ErrorClass {
    let Some(code) = code else {
        return match http_status {
            Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => ErrorClass::Permanent,
            Some(429) => ErrorClass::Throttle,
            _ => ErrorClass::Transient,
        };
    };
    if THROTTLE_CODES.contains(&code) {
        ErrorClass::Throttle
    } else if QUOTA_CODES.contains(&code) {
        ErrorClass::Quota
    } else if code == "VcpuLimitExceeded" {
        ErrorClass::Capacity(CapacityScope::QuotaGroup)
    } else if code == "InsufficientInstanceCapacity"
        || (code == "Unsupported" && message.contains("requested instance type"))
    {
        ErrorClass::Capacity(CapacityScope::InstanceType)
    } else if code == "InvalidInstanceID.NotFound" {
        ErrorClass::NotFound
    } else if TRANSIENT_CODES.contains(&code) || http_status.is_some_and(|s| s >= 500) {
        ErrorClass::Transient
    } else {
        ErrorClass::Permanent
    }
}

/// Whether an error of `code` with `message` is specific to the subnet tried, so that another
/// subnet may work: the code contains `Subnet`; or it is `InsufficientInstanceCapacity`,
/// `InsufficientVolumeCapacity` or `Unsupported`; or it contains `InvalidParameter` and the
/// message matches `( subnet |sufficient free [Ii]pv[46] addresses)`.
pub fn is_subnet_specific(code: &str, message: &str) -> bool {
    if code.contains("Subnet")
        || matches!(
            code,
            "InsufficientInstanceCapacity" | "InsufficientVolumeCapacity" | "Unsupported"
        )
    {
        return true;
    }
    if !code.contains("InvalidParameter") {
        return false;
    }
    if message.contains(" subnet ") {
        return true;
    }
    ["I", "i"].iter().any(|i| {
        ["4", "6"]
            .iter()
            .any(|v| message.contains(&format!("sufficient free {i}pv{v} addresses")))
    })
}

/// The throttling backoff of one call kind: d ← d × 3/2 + 1 s, clamped to [1 s, 60 s]; reset
/// to 0 by any other outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    current: Duration,
}

impl Backoff {
    /// The shortest delay.
    pub const MIN: Duration = Duration::from_secs(1);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(60);

    /// Advances the backoff after a throttling error and returns the delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current * 3 / 2 + Duration::from_secs(1);
        self.current = d.clamp(Self::MIN, Self::MAX);
        self.current
    }

    /// Forgets past throttling (any other outcome).
    pub fn reset(&mut self) {
        self.current = Duration::ZERO;
    }
}

/// An EC2 call failure before classification: the parts the tables look at.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RawError {
    /// The call, such as `RunInstances`.
    op: &'static str,
    /// The EC2 error code, if the service answered with one.
    code: Option<String>,
    /// The service's message, or a description of the transport failure.
    message: String,
    /// The HTTP status, if there was a response.
    status: Option<u16>,
    /// The class when the tables do not apply (a failure to load credentials).
    class: Option<ErrorClass>,
}

impl RawError {
    /// A failure that is not an EC2 error response, classified by the tables as a missing
    /// response (transient).
    fn other(op: &'static str, message: impl Into<String>) -> RawError {
        RawError {
            op,
            code: None,
            message: message.into(),
            status: None,
            class: None,
        }
    }

    fn from_sdk<E, R>(op: &'static str, e: &SdkError<E, R>) -> RawError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug + HttpStatus + 'static,
    {
        if let Some(c) = credentials_error(e) {
            return RawError {
                class: Some(credentials_class(c)),
                ..RawError::other(
                    op,
                    format!(
                        "could not load AWS credentials (DriverParameters has no AccessKeyID and \
                         SecretAccessKey, so the default chain was tried: environment, profile \
                         files, web identity, ECS, instance metadata): {}",
                        display_chain(c)
                    ),
                )
            };
        }
        let code = e.code().map(str::to_string);
        let message = match (e.message(), &code) {
            (Some(m), _) => m.to_string(),
            (None, Some(_)) => String::new(),
            (None, None) => DisplayErrorContext(e).to_string(),
        };
        RawError {
            op,
            code,
            message,
            status: e.raw_response().map(HttpStatus::status_code),
            class: None,
        }
    }

    fn class(&self) -> ErrorClass {
        self.class
            .unwrap_or_else(|| classify(self.code.as_deref(), &self.message, self.status))
    }

    fn text(&self) -> String {
        match &self.code {
            Some(c) if self.message.is_empty() => format!("{}: {c}", self.op),
            Some(c) => format!("{}: {c}: {}", self.op, self.message),
            None => format!("{}: {}", self.op, self.message),
        }
    }
}

/// The credentials provider's error behind a failed call, if that is why it failed.
fn credentials_error<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e CredentialsError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<CredentialsError>() {
            return Some(c);
        }
        cur = err.source();
    }
    None
}

/// `e` and its sources as one line: each level's message (not its `Debug` form), a level whose
/// message the previous one already holds skipped, joined by ": "; the lines of a multi-line
/// message (the chain's list of attempts) joined by "; " (by a space after a colon).
fn display_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    // A limit on the depth, in case a source chain loops.
    for _ in 0..16 {
        let Some(err) = cur else { break };
        let mut text = String::new();
        for line in err
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            if !text.is_empty() {
                text.push_str(if text.ends_with(':') { " " } else { "; " });
            }
            text.push_str(line);
        }
        if !text.is_empty() && !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// The class of a credentials failure: no source had credentials, or one was misconfigured,
/// is permanent until the configuration changes; a source that failed or timed out (IMDS or
/// ECS unreachable, for instance) is transient.
fn credentials_class(e: &CredentialsError) -> ErrorClass {
    match e {
        CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_) => {
            ErrorClass::Permanent
        }
        _ => ErrorClass::Transient,
    }
}

/// The HTTP status of a raw SDK response.
trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_ec2::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// An EC2 driver setup failure.
#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    /// A DriverParameters value is wrong.
    #[error(transparent)]
    Params(#[from] ConfigError),
    /// Only one of AccessKeyID and SecretAccessKey is set.
    #[error("EC2 DriverParameters: {0} is set but {1} is not; set both or neither")]
    HalfCredentials(&'static str, &'static str),
}

/// The default AWS credential chain, built on its first use so that constructing the driver
/// reads no file and makes no call. `aws-config` then reads the environment and the profile
/// files when it builds the chain, and the providers fetch on each call; the SDK's identity
/// cache in front of this provider keeps the result until it is about to expire.
#[derive(Debug)]
struct DefaultChain {
    region: Region,
    http: SharedHttpClient,
    chain: tokio::sync::OnceCell<DefaultCredentialsChain>,
}

impl DefaultChain {
    fn new(region: Region, http: SharedHttpClient) -> DefaultChain {
        DefaultChain {
            region,
            http,
            chain: tokio::sync::OnceCell::new(),
        }
    }

    async fn chain(&self) -> &DefaultCredentialsChain {
        self.chain
            .get_or_init(|| async {
                let conf = ProviderConfig::default()
                    .with_http_client(self.http.clone())
                    .with_region(Some(self.region.clone()))
                    .with_behavior_version(Some(BehaviorVersion::latest()));
                DefaultCredentialsChain::builder()
                    .region(self.region.clone())
                    .configure(conf)
                    .build()
                    .await
            })
            .await
    }
}

impl ProvideCredentials for DefaultChain {
    fn provide_credentials<'a>(&'a self) -> ProvideCredentialsFuture<'a>
    where
        Self: 'a,
    {
        ProvideCredentialsFuture::new(async move { self.chain().await.provide_credentials().await })
    }
}

/// Mutable driver state.
#[derive(Default)]
struct State {
    /// The subnet index the next create starts at.
    subnet_start: usize,
    /// Throttling backoff of RunInstances.
    create_backoff: Backoff,
    /// Throttling backoff of DescribeInstances.
    list_backoff: Backoff,
    /// Imported key pair names by first fingerprint.
    key_names: HashMap<String, String>,
    /// Spot price history by (type, spot, zone), newest first and normalised.
    prices: HashMap<PriceKey, Vec<PricePoint>>,
    /// When each key of `prices` was last updated.
    prices_updated: HashMap<PriceKey, Timestamp>,
    /// `ec2_instance_starts_total`: RunInstances attempts by (subnet, success).
    starts: BTreeMap<(String, bool), u64>,
    /// `ec2_instances`: instances per subnet in the last listing (None before the first).
    instances_by_subnet: Option<BTreeMap<String, u64>>,
}

/// What a spot price history is kept for (Go's `priceKey`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PriceKey {
    /// The provider type.
    instance_type: String,
    /// Always true: only spot prices are looked up.
    spot: bool,
    /// The availability zone ("" when DescribeInstanceStatus did not tell).
    availability_zone: String,
}

/// A listed instance, before prices are attached.
struct Listed {
    info: InstanceInfo,
    /// `InstanceLifecycle` is `spot`.
    spot: bool,
    /// `SubnetId` ("" for none), for `ec2_instances`.
    subnet: String,
}

/// The `subnet_id` label values of the configured subnets: each of them, or `""` for none.
fn subnet_labels(subnets: &[String]) -> Vec<String> {
    if subnets.is_empty() {
        vec![String::new()]
    } else {
        subnets.to_vec()
    }
}

/// The EC2 instance set.
pub struct Ec2 {
    client: aws_sdk_ec2::Client,
    params: Ec2Params,
    state: Mutex<State>,
    clock: Clock,
}

impl fmt::Debug for Ec2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Ec2 {
    /// A driver from the DriverParameters object `v` (errors name `DriverParameters.<key>`).
    pub fn from_driver_parameters(v: &serde_json::Value) -> Result<Ec2, Ec2Error> {
        Ec2::new(Ec2Params::from_driver_parameters("DriverParameters", v)?)
    }

    /// A driver with `params` and the wall clock. Credentials are the static keys of `params`
    /// when both are set, else the default AWS chain, which is built and asked on the first
    /// request: this makes no call and reads no file.
    pub fn new(params: Ec2Params) -> Result<Ec2, Ec2Error> {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let region = Region::new(params.region.clone());
        let mut conf = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(region.clone())
            .http_client(http.clone())
            .identity_cache(
                IdentityCache::lazy()
                    .buffer_time(CREDENTIALS_EXPIRY_WINDOW)
                    .build(),
            )
            .retry_config(RetryConfig::disabled());
        conf = match (
            params.access_key_id.is_empty(),
            params.secret_access_key.is_empty(),
        ) {
            (false, false) => conf.credentials_provider(Credentials::new(
                params.access_key_id.clone(),
                params.secret_access_key.clone(),
                None,
                None,
                "DriverParameters",
            )),
            (false, true) => {
                return Err(Ec2Error::HalfCredentials("AccessKeyID", "SecretAccessKey"));
            }
            (true, false) => {
                return Err(Ec2Error::HalfCredentials("SecretAccessKey", "AccessKeyID"));
            }
            (true, true) => conf.credentials_provider(DefaultChain::new(region, http)),
        };
        if let Some(url) = &params.endpoint {
            conf = conf.endpoint_url(url.clone());
        }
        let mut state = State::default();
        for subnet in subnet_labels(&params.subnet_ids) {
            for success in [false, true] {
                state.starts.insert((subnet.clone(), success), 0);
            }
        }
        Ok(Ec2 {
            client: aws_sdk_ec2::Client::from_conf(conf.build()),
            params,
            state: Mutex::new(state),
            clock: Arc::new(crate::runtime::wall_clock),
        })
    }

    /// Replaces the clock used for rate-limit retry times (tests use a fixed one).
    pub fn with_clock(mut self, clock: Clock) -> Ec2 {
        self.clock = clock;
        self
    }

    /// The parameters in use.
    pub fn params(&self) -> &Ec2Params {
        &self.params
    }

    /// The subnet index the next create starts at.
    pub fn next_subnet_index(&self) -> usize {
        self.state().subnet_start
    }

    /// The driver's metric families (reference-workers.md §8), sorted by name, each with its
    /// samples sorted by label values: `ec2_instance_starts_total` always, `ec2_instances` once
    /// a listing has succeeded.
    pub fn metric_families(&self) -> Vec<Family> {
        let st = self.state();
        let mut out = vec![Family {
            name: format!("{PREFIX}{METRIC_INSTANCE_STARTS}"),
            help: "Number of attempts to start a new instance",
            kind: Kind::Counter,
            samples: st
                .starts
                .iter()
                .map(|((subnet, success), n)| Sample {
                    labels: vec![
                        ("subnet_id", subnet.clone()),
                        ("success", if *success { "1" } else { "0" }.to_string()),
                    ],
                    value: SampleValue::Scalar(*n as f64),
                })
                .collect(),
        }];
        if let Some(by_subnet) = &st.instances_by_subnet {
            out.push(Family {
                name: format!("{PREFIX}{METRIC_INSTANCES}"),
                help: "Number of instances running",
                kind: Kind::Gauge,
                samples: by_subnet
                    .iter()
                    .map(|(subnet, n)| Sample {
                        labels: vec![("subnet_id", subnet.clone())],
                        value: SampleValue::Scalar(*n as f64),
                    })
                    .collect(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Sets `ec2_instances` from a listing: `""`, every configured subnet and every subnet seen
    /// before start at 0, then each instance counts under its subnet.
    fn count_instances<'l>(&self, subnets: impl Iterator<Item = &'l str>) {
        let mut st = self.state();
        let mut by_subnet: BTreeMap<String, u64> = st
            .instances_by_subnet
            .take()
            .unwrap_or_default()
            .into_keys()
            .map(|k| (k, 0))
            .collect();
        by_subnet.insert(String::new(), 0);
        for s in &self.params.subnet_ids {
            by_subnet.insert(s.clone(), 0);
        }
        for s in subnets {
            *by_subnet.entry(s.to_string()).or_default() += 1;
        }
        st.instances_by_subnet = Some(by_subnet);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the plain-data state inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns a classified RunInstances or DescribeInstances error into a [`CloudError`],
    /// advancing (on throttling) or resetting the `backoff` chosen by `pick`.
    fn wrap(&self, raw: &RawError, pick: fn(&mut State) -> &mut Backoff) -> CloudError {
        let class = raw.class();
        let kind = {
            let mut st = self.state();
            let backoff = pick(&mut st);
            if class == ErrorClass::Throttle {
                let d = backoff.next_delay();
                let now = (self.clock)();
                CloudErrorKind::RateLimited {
                    retry_at: Timestamp(
                        now.as_millis()
                            .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    ),
                }
            } else {
                backoff.reset();
                plain_kind(class)
            }
        };
        cloud_error(kind, raw.text())
    }

    /// Classifies an error of a call without backoff state (Destroy, SetTags, key pairs):
    /// throttling there is transient, as Go only logs those errors.
    fn unwrapped(raw: &RawError) -> CloudError {
        cloud_error(plain_kind(raw.class()), raw.text())
    }

    /// The key pair name for `key` (Go's `getKeyName`): a cached import, else the first key
    /// pair whose fingerprint matches (not cached), else a new import (cached).
    async fn key_name(&self, key: &PublicKey) -> Result<String, CloudError> {
        let fps = key_fingerprints(key).map_err(|e| {
            cloud_error(
                CloudErrorKind::Permanent,
                format!("Could not make key fingerprint: {e}"),
            )
        })?;
        if let Some(name) = self.state().key_names.get(&fps[0]) {
            return Ok(name.clone());
        }
        let found = self
            .client
            .describe_key_pairs()
            .filters(
                Filter::builder()
                    .name("fingerprint")
                    .set_values(Some(fps.clone()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                let raw = RawError::from_sdk("DescribeKeyPairs", &e);
                cloud_error(
                    CloudErrorKind::Permanent,
                    format!("Could not search for keypair: {}", raw.text()),
                )
            })?;
        if let Some(name) = found.key_pairs().iter().find_map(|k| k.key_name()) {
            return Ok(name.to_string());
        }
        let name = format!("{KEY_PAIR_NAME_PREFIX}{}", fps[0]);
        let material = key.to_openssh().map_err(|e| {
            cloud_error(
                CloudErrorKind::Permanent,
                format!("Could not encode public key: {e}"),
            )
        })?;
        let imported = self
            .client
            .import_key_pair()
            .key_name(&name)
            .public_key_material(Blob::new(material.into_bytes()))
            .send()
            .await;
        if let Err(e) = imported {
            let raw = RawError::from_sdk("ImportKeyPair", &e);
            // The name holds this key's fingerprint: a key pair of that name is this key,
            // imported earlier by another driver instance even if the fingerprint search above
            // missed it (moto records another fingerprint for Ed25519 keys).
            if raw.code.as_deref() != Some(KEY_PAIR_DUPLICATE) {
                return Err(cloud_error(
                    CloudErrorKind::Permanent,
                    format!("Could not import keypair: {}", raw.text()),
                ));
            }
            tracing::debug!(key_pair = %name, "key pair already imported");
        }
        self.state().key_names.insert(fps[0].clone(), name.clone());
        Ok(name)
    }

    /// One RunInstances call on `subnet` (None: no subnet configured).
    async fn run_instances(
        &self,
        req: &CreateRequest,
        subnet: Option<&str>,
        key_name: Option<&str>,
    ) -> Result<InstanceInfo, RawError> {
        let t = &req.instance_type;
        let tags: Vec<Tag> = req
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let nic = InstanceNetworkInterfaceSpecification::builder()
            .associate_public_ip_address(false)
            .delete_on_termination(true)
            .device_index(0)
            .set_groups(Some(self.params.security_group_ids.clone()))
            .set_subnet_id(subnet.map(str::to_string))
            .build();
        let mut call = self
            .client
            .run_instances()
            .image_id(&req.image_id)
            .instance_type(aws_sdk_ec2::types::InstanceType::from(
                t.provider_type.as_str(),
            ))
            .min_count(1)
            .max_count(1)
            .network_interfaces(nic)
            .disable_api_termination(false)
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags))
                    .build(),
            )
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .http_tokens(HttpTokensState::Required)
                    .build(),
            )
            .user_data(base64(
                format!("#!/bin/sh\n{}\n", req.init_command).as_bytes(),
                true,
            ));
        if let Some(k) = key_name {
            call = call.key_name(k);
        }
        if t.added_scratch > 0 {
            let gib = (t.added_scratch + GIB - 1) / GIB;
            call = call.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(SCRATCH_DEVICE)
                    .ebs(
                        EbsBlockDevice::builder()
                            .delete_on_termination(true)
                            .volume_size(i32::try_from(gib).unwrap_or(i32::MAX))
                            .volume_type(VolumeType::from(self.params.ebs_volume_type.as_str()))
                            .build(),
                    )
                    .build(),
            );
        }
        if t.preemptible {
            call = call.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .max_price(go_float(t.price))
                            .build(),
                    )
                    .build(),
            );
        }
        if !self.params.iam_instance_profile.is_empty() {
            call = call.iam_instance_profile(
                IamInstanceProfileSpecification::builder()
                    .name(&self.params.iam_instance_profile)
                    .build(),
            );
        }
        let out = call
            .send()
            .await
            .map_err(|e| RawError::from_sdk("RunInstances", &e))?;
        let inst = out
            .instances()
            .first()
            .ok_or_else(|| RawError::other("RunInstances", "the response lists no instance"))?;
        Ok(self.info(inst))
    }

    /// The core's view of an EC2 instance.
    fn info(&self, inst: &aws_sdk_ec2::types::Instance) -> InstanceInfo {
        InstanceInfo {
            id: inst.instance_id().unwrap_or_default().to_string(),
            address: inst.private_ip_address().unwrap_or_default().to_string(),
            provider_type: inst
                .instance_type()
                .map(|t| t.as_str().to_string())
                .unwrap_or_default(),
            tags: inst
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
                .collect(),
            remote_user: self.params.admin_username.clone(),
            ..InstanceInfo::default()
        }
    }

    async fn do_create(&self, req: CreateRequest) -> Result<InstanceInfo, CloudError> {
        let key_name = match &req.public_key {
            Some(k) => Some(self.key_name(k).await?),
            None => None,
        };
        let subnets = &self.params.subnet_ids;
        let n = subnets.len().max(1);
        let start = self.state().subnet_start % n;
        let mut last: Option<RawError> = None;
        let mut capacity: Option<RawError> = None;
        for offset in 0..n {
            let idx = (start + offset) % n;
            let subnet = subnets.get(idx).map(String::as_str);
            let result = self.run_instances(&req, subnet, key_name.as_deref()).await;
            {
                let mut st = self.state();
                st.subnet_start = idx;
                *st.starts
                    .entry((subnet.unwrap_or("").to_string(), result.is_ok()))
                    .or_default() += 1;
            }
            match result {
                Ok(info) => {
                    self.state().create_backoff.reset();
                    return Ok(info);
                }
                Err(raw) => {
                    let retry_elsewhere = raw
                        .code
                        .as_deref()
                        .is_some_and(|c| is_subnet_specific(c, &raw.message));
                    tracing::debug!(
                        subnet = subnet.unwrap_or(""),
                        error = %raw.text(),
                        retry_elsewhere,
                        "RunInstances failed"
                    );
                    if matches!(raw.class(), ErrorClass::Capacity(_)) {
                        capacity = Some(raw.clone());
                    }
                    last = Some(raw);
                    if !retry_elsewhere {
                        break;
                    }
                }
            }
        }
        let raw = capacity
            .or(last)
            .unwrap_or_else(|| RawError::other("RunInstances", "no attempt was made"));
        Err(self.wrap(&raw, |s| &mut s.create_backoff))
    }

    async fn do_list(
        &self,
        filter: &BTreeMap<String, String>,
    ) -> Result<Vec<InstanceInfo>, CloudError> {
        let filters: Vec<Filter> = filter
            .iter()
            .map(|(k, v)| Filter::builder().name(format!("tag:{k}")).values(v).build())
            .collect();
        let mut out: Vec<Listed> = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| {
                    let raw = RawError::from_sdk("DescribeInstances", &e);
                    self.wrap(&raw, |s| &mut s.list_backoff)
                })?;
            for inst in page.reservations().iter().flat_map(|r| r.instances()) {
                let state = inst.state().and_then(|s| s.name());
                if matches!(
                    state,
                    Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated)
                ) {
                    continue;
                }
                out.push(Listed {
                    info: self.info(inst),
                    spot: inst.instance_lifecycle() == Some(&InstanceLifecycleType::Spot),
                    subnet: inst.subnet_id().unwrap_or_default().to_string(),
                });
            }
            // An empty token also ends the listing (Arvados bug #22400).
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        self.state().list_backoff.reset();
        self.count_instances(out.iter().map(|l| l.subnet.as_str()));
        let interval = self.params.spot_price_update_interval;
        if interval.is_zero() || !out.iter().any(|l| l.spot) {
            return Ok(out.into_iter().map(|l| l.info).collect());
        }
        let zones = self.availability_zones().await;
        let keys: Vec<Option<PriceKey>> = out
            .iter()
            .map(|l| {
                l.spot.then(|| PriceKey {
                    instance_type: l.info.provider_type.clone(),
                    spot: true,
                    availability_zone: zones.get(&l.info.id).cloned().unwrap_or_default(),
                })
            })
            .collect();
        self.update_spot_prices(keys.iter().flatten()).await;
        let st = self.state();
        Ok(out
            .into_iter()
            .zip(keys)
            .map(|(l, key)| {
                let mut info = l.info;
                if let Some(history) = key.and_then(|k| st.prices.get(&k))
                    && !history.is_empty()
                {
                    info.price_history = history.clone();
                    info.scratch_gib_month_price = self.params.ebs_price;
                }
                info
            })
            .collect())
    }

    /// Instance ID → availability zone, from `DescribeInstanceStatus` with
    /// `IncludeAllInstances`, paged. An error is logged and ends the lookup (the zones found so
    /// far are kept), as in Go.
    async fn availability_zones(&self) -> HashMap<String, String> {
        let mut zones = HashMap::new();
        let mut token: Option<String> = None;
        loop {
            let page = match self
                .client
                .describe_instance_status()
                .include_all_instances(true)
                .set_next_token(token.take())
                .send()
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    let raw = RawError::from_sdk("DescribeInstanceStatus", &e);
                    tracing::warn!(error = %raw.text(), "error getting instance statuses");
                    break;
                }
            };
            for st in page.instance_statuses() {
                if let (Some(id), Some(zone)) = (st.instance_id(), st.availability_zone()) {
                    zones.insert(id.to_string(), zone.to_string());
                }
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        zones
    }

    /// Go's `updateSpotPrices`: when any of `keys` was last updated more than
    /// SpotPriceUpdateInterval ago (or never), fetch `DescribeSpotPriceHistory` from now − 3 ×
    /// the interval for the keys' types (`Linux/UNIX`), paged; append each record to its key's
    /// history and mark the key updated; drop keys not updated for 64 intervals; normalise.
    /// Bogus records (no type, price, time or zone; a price that does not parse or is negative)
    /// are skipped; an error is logged and keeps what was fetched before it.
    async fn update_spot_prices<'k>(&self, keys: impl Iterator<Item = &'k PriceKey>) {
        let interval = self.params.spot_price_update_interval;
        let now = (self.clock)();
        let stale = now - interval;
        let mut types = BTreeSet::new();
        let mut need_update = false;
        {
            let st = self.state();
            for k in keys {
                if st.prices_updated.get(k).is_none_or(|t| *t < stale) {
                    need_update = true;
                }
                types.insert(k.instance_type.clone());
            }
        }
        if !need_update {
            return;
        }
        let start = now - interval.saturating_mul(3);
        let filters = vec![
            Filter::builder()
                .name("instance-type")
                .set_values(Some(types.into_iter().collect()))
                .build(),
            Filter::builder()
                .name("product-description")
                .values(SPOT_PRODUCT_DESCRIPTION)
                .build(),
        ];
        let mut fetched: Vec<(PriceKey, PricePoint)> = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = match self
                .client
                .describe_spot_price_history()
                .start_time(DateTime::from_millis(
                    i64::try_from(start.as_millis()).unwrap_or(i64::MAX),
                ))
                .set_filters(Some(filters.clone()))
                .set_next_token(token.take())
                .send()
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    let raw = RawError::from_sdk("DescribeSpotPriceHistory", &e);
                    tracing::warn!(error = %raw.text(), "error retrieving spot instance prices");
                    break;
                }
            };
            for rec in page.spot_price_history() {
                let (Some(itype), Some(price), Some(ts), Some(zone)) = (
                    rec.instance_type().map(|t| t.as_str()),
                    rec.spot_price(),
                    rec.timestamp(),
                    rec.availability_zone(),
                ) else {
                    continue;
                };
                let Ok(price) = price.trim().parse::<f64>() else {
                    continue;
                };
                let Some(ms) = ts.to_millis().ok().and_then(|ms| u64::try_from(ms).ok()) else {
                    continue;
                };
                if itype.is_empty() || !price.is_finite() || price < 0.0 {
                    continue;
                }
                fetched.push((
                    PriceKey {
                        instance_type: itype.to_string(),
                        spot: true,
                        availability_zone: zone.to_string(),
                    },
                    PricePoint {
                        start_time: Timestamp(ms),
                        price,
                    },
                ));
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        let mut st = self.state();
        let st = &mut *st;
        for (key, point) in fetched {
            st.prices.entry(key.clone()).or_default().push(point);
            st.prices_updated.insert(key, now);
        }
        let expired = now - interval.saturating_mul(64);
        st.prices_updated.retain(|_, t| *t >= expired);
        let updated = &st.prices_updated;
        st.prices.retain(|k, _| updated.contains_key(k));
        for history in st.prices.values_mut() {
            *history = normalize_price_history(std::mem::take(history));
        }
    }
}

/// The core kind of a class outside the throttling path.
fn plain_kind(class: ErrorClass) -> CloudErrorKind {
    match class {
        ErrorClass::Throttle | ErrorClass::Transient => CloudErrorKind::Transient,
        ErrorClass::Quota => CloudErrorKind::Quota,
        ErrorClass::Capacity(scope) => CloudErrorKind::Capacity(scope),
        ErrorClass::NotFound => CloudErrorKind::NotFound,
        ErrorClass::Permanent => CloudErrorKind::Permanent,
    }
}

impl InstanceSet for Ec2 {
    fn create<'a>(&'a self, req: CreateRequest) -> BoxFuture<'a, Result<InstanceInfo, CloudError>> {
        Box::pin(self.do_create(req))
    }

    fn list<'a>(
        &'a self,
        filter: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<InstanceInfo>, CloudError>> {
        Box::pin(self.do_list(filter))
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(async move {
            self.client
                .terminate_instances()
                .instance_ids(id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| Self::unwrapped(&RawError::from_sdk("TerminateInstances", &e)))
        })
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(async move {
            let tags: Vec<Tag> = tags
                .iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect();
            self.client
                .create_tags()
                .resources(id)
                .set_tags(Some(tags))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| Self::unwrapped(&RawError::from_sdk("CreateTags", &e)))
        })
    }

    fn stop<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn metrics(&self) -> Vec<Family> {
        self.metric_families()
    }
}

/// The fingerprints EC2 may have recorded for `key`, the first being the one used in imported
/// key pair names: for RSA, the MD5 and then the SHA-1 of the PKIX DER public key as
/// colon-separated hex; for Ed25519, `SHA256:<base64>` without and then with a trailing `=`.
pub fn key_fingerprints(key: &PublicKey) -> Result<Vec<String>, String> {
    match key.key_data() {
        KeyData::Rsa(rsa) => {
            let n = rsa
                .n()
                .as_positive_bytes()
                .ok_or("the RSA modulus is not positive")?;
            let e = rsa
                .e()
                .as_positive_bytes()
                .ok_or("the RSA exponent is not positive")?;
            let der = rsa_pkix_der(n, e);
            let md5 = {
                use md5::Digest;
                md5::Md5::digest(&der).to_vec()
            };
            Ok(vec![colon_hex(&md5), colon_hex(&sha1(&der))])
        }
        KeyData::Ed25519(_) => {
            // ssh-key formats SHA256 fingerprints as `SHA256:` + unpadded base64.
            let fp = key.fingerprint(HashAlg::Sha256).to_string();
            Ok(vec![fp.clone(), format!("{fp}=")])
        }
        other => Err(format!(
            "unsupported key type {}",
            other.algorithm().as_str()
        )),
    }
}

/// Lower-case hex bytes joined by colons.
fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// DER length octets.
fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// A DER element with `tag` around `content`.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(content.len(), &mut out);
    out.extend_from_slice(content);
    out
}

/// A DER INTEGER of the unsigned big-endian `bytes`.
fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed: &[u8] = {
        let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        &bytes[first..]
    };
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(trimmed);
    der(0x02, &content)
}

/// The PKIX SubjectPublicKeyInfo DER of an RSA public key (Go's `x509.MarshalPKIXPublicKey`).
fn rsa_pkix_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }.
    const ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let rsa_key = der(0x30, &[der_uint(n), der_uint(e)].concat());
    let mut bits = vec![0u8];
    bits.extend(rsa_key);
    der(0x30, &[ALGORITHM.to_vec(), der(0x03, &bits)].concat())
}

/// SHA-1 (FIPS 180-4), only for the legacy key pair fingerprint EC2 computes.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for chunk in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in chunk.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let temp = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = temp;
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// Standard base64, with or without `=` padding.
pub fn base64(data: &[u8], pad: bool) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// `f` formatted as Go's `%v` formats a float64 (shortest representation; exponent form with
/// at least two exponent digits below 1e-4 and from 1e21).
pub fn go_float(f: f64) -> String {
    if f == 0.0 || !f.is_finite() {
        return format!("{f}");
    }
    let exp = f.abs().log10().floor() as i32;
    if (-4..21).contains(&exp) {
        return format!("{f}");
    }
    // Rust writes "1e-5" or "1.5e21"; Go writes "1e-05" and "1.5e+21".
    let s = format!("{f:e}");
    match s.split_once('e') {
        Some((mantissa, e)) => {
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', e),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_sequence_and_reset() {
        let mut b = Backoff::default();
        let got: Vec<u128> = (0..10).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(
            got,
            [
                1000, 2500, 4750, 8125, 13187, 20781, 32171, 49257, 60000, 60000
            ]
        );
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn sha1_known_answers() {
        assert_eq!(
            colon_hex(&sha1(b"abc")).replace(':', ""),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            colon_hex(&sha1(b"")).replace(':', ""),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        let long = vec![b'a'; 1000];
        assert_eq!(
            colon_hex(&sha1(&long)).replace(':', ""),
            "291e9a6c66994949b57ba5e650361e98fc36b1ba"
        );
    }

    #[test]
    fn base64_both_forms() {
        assert_eq!(base64(b"", true), "");
        assert_eq!(base64(b"f", true), "Zg==");
        assert_eq!(base64(b"fo", true), "Zm8=");
        assert_eq!(base64(b"foo", true), "Zm9v");
        assert_eq!(base64(b"foob", false), "Zm9vYg");
        assert_eq!(base64(b"#!/bin/sh\n", true), "IyEvYmluL3NoCg==");
    }

    #[test]
    fn go_float_matches_go_percent_v() {
        assert_eq!(go_float(0.1), "0.1");
        assert_eq!(go_float(1.0), "1");
        assert_eq!(go_float(0.0001), "0.0001");
        assert_eq!(go_float(0.00001), "1e-05");
        assert_eq!(go_float(2.5e21), "2.5e+21");
        assert_eq!(go_float(123.456), "123.456");
    }

    #[test]
    fn der_integers() {
        assert_eq!(
            der_uint(&[0x01, 0x00, 0x01]),
            [0x02, 0x03, 0x01, 0x00, 0x01]
        );
        assert_eq!(der_uint(&[0x00, 0x80]), [0x02, 0x02, 0x00, 0x80]);
        let mut l = Vec::new();
        der_len(257, &mut l);
        assert_eq!(l, [0x82, 0x01, 0x01]);
    }

    #[test]
    fn credentials_failures_are_classified_and_described_on_one_line() {
        assert_eq!(
            credentials_class(&CredentialsError::not_loaded("no role")),
            ErrorClass::Permanent
        );
        assert_eq!(
            credentials_class(&CredentialsError::invalid_configuration("bad profile")),
            ErrorClass::Permanent
        );
        assert_eq!(
            credentials_class(&CredentialsError::provider_error("IMDS answered 500")),
            ErrorClass::Transient
        );
        assert_eq!(
            credentials_class(&CredentialsError::provider_timed_out(Duration::from_secs(
                5
            ))),
            ErrorClass::Transient
        );
        let e = CredentialsError::not_loaded(
            "no credentials found in chain. Attempted:\n  A: nope\n  B: none",
        );
        assert_eq!(
            display_chain(&e),
            "the credential provider was not enabled: no credentials found in chain. Attempted: A: nope; B: none"
        );
        // A source whose message the level above already holds is not repeated.
        #[derive(Debug)]
        struct Outer(CredentialsError);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "wrapped: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let outer = Outer(CredentialsError::provider_error("down"));
        assert_eq!(
            display_chain(&outer),
            "wrapped: an error occurred while loading credentials: down"
        );
        assert!(credentials_error(&outer).is_some());
    }

    #[test]
    fn subnet_specific_rules() {
        for (code, msg, want) in [
            ("InvalidSubnetID.NotFound", "", true),
            ("InsufficientFreeAddressesInSubnet", "", true),
            ("InsufficientInstanceCapacity", "", true),
            ("InsufficientVolumeCapacity", "", true),
            ("Unsupported", "anything", true),
            (
                "InvalidParameterValue",
                "Not enough free addresses in subnet subnet-1234 to satisfy the request",
                true,
            ),
            (
                "Client.InvalidParameterValue",
                "There aren't sufficient free Ipv4 addresses or prefixes",
                true,
            ),
            (
                "ClientInvalidParameterValue",
                "There aren't sufficient free ipv6 addresses",
                true,
            ),
            ("InvalidParameterValue", "bad AMI", false),
            ("InstanceLimitExceeded", "", false),
            ("RequestLimitExceeded", "", false),
        ] {
            assert_eq!(is_subnet_specific(code, msg), want, "{code} {msg:?}");
        }
    }
}
