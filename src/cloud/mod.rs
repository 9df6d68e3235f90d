//! Cloud drivers behind one object-safe [`InstanceSet`] trait (reference-workers.md §6.1):
//! the loopback driver here; EC2 and Azure behind the `ec2` and `azure` features.
//!
//! The trait's results are the core's own types, so the runtime turns them into inputs without
//! conversion: `create` gives the `InstanceInfo` of `Input::CreateFinished`, `list` the vector of
//! `Input::InstancesListed`, and every error is a [`CloudError`] whose kind the driver classified
//! (Quota, Capacity(scope), RateLimited{retry_at}, NotFound, Transient, Permanent), so the core
//! never parses provider strings.
//!
//! Host keys: [`InstanceSet::verify_host_key`] is the driver's own check (loopback compares the
//! key with the one it generated); drivers that have none return
//! [`HostKeyError::NotImplemented`], and [`InstanceVerifier`] then falls back to the instance
//! secret (§5.3).
//!
//! Metrics: a driver may export its own families through [`InstanceSet::metrics`] (EC2: the
//! per-subnet instance gauge and start counter); the management API appends them to the
//! dispatcher's.
//!
//! Invariant: drivers put no credential into an error message, a log line or a metric.

#[cfg(feature = "azure")]
pub mod azure;
#[cfg(feature = "ec2")]
pub mod ec2;
pub mod loopback;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use russh::keys::PublicKey;

pub use crate::core::command::{CapacityScope, CloudError, CloudErrorKind};
pub use crate::core::types::InstanceInfo;
use crate::core::types::InstanceType;
use crate::http::metrics::Family;
pub use crate::ssh::BoxFuture;
use crate::ssh::{
    HostKeyError, HostKeyVerifier, Target, UnverifiedConnection, verify_instance_secret,
};

/// A [`CloudError`] of `kind` with `message`.
pub fn cloud_error(kind: CloudErrorKind, message: impl Into<String>) -> CloudError {
    CloudError {
        kind,
        message: message.into(),
    }
}

/// What `create` needs (the fields of the core's `Command::Create`, with the key resolved).
#[derive(Clone, Debug)]
pub struct CreateRequest {
    /// The configured type.
    pub instance_type: Arc<InstanceType>,
    /// `CloudVMs.ImageID`.
    pub image_id: String,
    /// Every tag: ResourceTags merged under the four reserved ones.
    pub tags: BTreeMap<String, String>,
    /// The init command (instance-secret writer, then InstanceInitCommand).
    pub init_command: String,
    /// The dispatcher's public key to authorise for the remote user, if DeployPublicKey is on.
    pub public_key: Option<PublicKey>,
}

/// One cloud account's instances as this dispatcher sees them (Go's `cloud.InstanceSet`).
///
/// Object safe: the runtime holds an `Arc<dyn InstanceSet>`.
pub trait InstanceSet: Send + Sync {
    /// Creates an instance and returns it (its address may still be "").
    fn create<'a>(&'a self, req: CreateRequest) -> BoxFuture<'a, Result<InstanceInfo, CloudError>>;

    /// Lists the instances carrying every tag in `filter` (booting and shutting-down ones
    /// included).
    fn list<'a>(
        &'a self,
        filter: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<InstanceInfo>, CloudError>>;

    /// Destroys an instance. An unknown ID is [`CloudErrorKind::NotFound`].
    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), CloudError>>;

    /// Replaces an instance's tags with `tags`.
    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), CloudError>>;

    /// The driver's own check of a host key presented by instance `id`. `conn` is the new,
    /// unverified connection, on which the driver may run commands. The default has no check.
    fn verify_host_key<'a>(
        &'a self,
        id: &'a str,
        key: &'a PublicKey,
        conn: &'a UnverifiedConnection<'a>,
    ) -> BoxFuture<'a, Result<(), HostKeyError>> {
        let _ = (id, key, conn);
        Box::pin(async { Err(HostKeyError::NotImplemented) })
    }

    /// Releases the driver's resources (loopback: stops the SSH servers). Instances are not
    /// destroyed; the next process recovers them.
    fn stop<'a>(&'a self) -> BoxFuture<'a, ()>;

    /// The driver's own metric families, which `/metrics` and `/metrics.json` export next to
    /// the dispatcher's (Go's drivers register theirs in the same registry). Names carry the
    /// `arvados_dispatchcloud_` prefix and must not clash with the dispatcher's. Called on
    /// every scrape, so it must be cheap and must not block. The default has none.
    fn metrics(&self) -> Vec<Family> {
        Vec::new()
    }
}

/// A callback given an instance ID each time a connection to it reaches host-key verification.
pub type ConnectHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The host-key verifier of one instance (Go's `TagVerifier`): the driver's check first; if
/// the driver has none, the instance secret from the `InstanceSecret` tag. An instance without
/// either can never be verified.
#[derive(Clone)]
pub struct InstanceVerifier {
    set: Arc<dyn InstanceSet>,
    instance: String,
    secret: String,
    on_connect: Option<ConnectHook>,
}

impl InstanceVerifier {
    /// A verifier for instance `instance` of `set`, expecting `secret` ("" if the tag is
    /// missing).
    pub fn new(
        set: Arc<dyn InstanceSet>,
        instance: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        InstanceVerifier {
            set,
            instance: instance.into(),
            secret: secret.into(),
            on_connect: None,
        }
    }

    /// Calls `f(instance id)` each time a connection reaches verification (the runtime feeds
    /// the core `Input::SshConnected` from it).
    pub fn on_connect(mut self, f: ConnectHook) -> Self {
        self.on_connect = Some(f);
        self
    }
}

impl fmt::Debug for InstanceVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceVerifier")
            .field("instance", &self.instance)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl HostKeyVerifier for InstanceVerifier {
    fn verify_host_key<'a>(
        &'a self,
        key: &'a PublicKey,
        conn: &'a UnverifiedConnection<'a>,
    ) -> BoxFuture<'a, Result<(), HostKeyError>> {
        Box::pin(async move {
            if let Some(f) = &self.on_connect {
                f(&self.instance);
            }
            match self.set.verify_host_key(&self.instance, key, conn).await {
                Err(HostKeyError::NotImplemented) => {
                    verify_instance_secret(conn, &self.secret).await
                }
                other => other,
            }
        })
    }
}

/// The SSH target of instance `info` of `set`: its address and user, verified by an
/// [`InstanceVerifier`] expecting `secret` (the `InstanceSecret` tag value, "" if missing).
pub fn ssh_target(
    set: Arc<dyn InstanceSet>,
    info: &InstanceInfo,
    secret: &str,
    on_connect: Option<ConnectHook>,
) -> Target {
    let mut verifier = InstanceVerifier::new(set, info.id.clone(), secret);
    if let Some(f) = on_connect {
        verifier = verifier.on_connect(f);
    }
    Target {
        address: info.address.clone(),
        remote_user: info.remote_user.clone(),
        verifier: Arc::new(verifier),
    }
}

/// A driver that cannot be set up from the config.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// `CloudVMs.Driver` names a driver this build does not have.
    #[error("cloud driver {0:?} is not available in this build (it has: loopback)")]
    Unknown(String),
    /// The loopback driver's parameters or state file are bad.
    #[error(transparent)]
    Loopback(#[from] loopback::LoopbackError),
    /// The Azure driver's parameters are bad.
    #[cfg(feature = "azure")]
    #[error(transparent)]
    Azure(#[from] azure::AzureError),
    /// The EC2 driver's parameters or credentials are bad.
    #[cfg(feature = "ec2")]
    #[error(transparent)]
    Ec2(#[from] ec2::Ec2Error),
}

/// The instance set for `CloudVMs.Driver` = `driver` with `DriverParameters` = `params`.
pub async fn new_instance_set(
    driver: &str,
    params: &serde_json::Value,
) -> Result<Arc<dyn InstanceSet>, DriverError> {
    match driver {
        "loopback" => {
            let params = loopback::LoopbackParams::from_driver_parameters(params)?;
            Ok(Arc::new(loopback::Loopback::new(params).await?))
        }
        #[cfg(feature = "ec2")]
        "ec2" => Ok(Arc::new(ec2::Ec2::from_driver_parameters(params)?)),
        #[cfg(feature = "azure")]
        "azure" => Ok(Arc::new(azure::Azure::from_driver_parameters(
            params, None,
        )?)),
        other => Err(DriverError::Unknown(other.to_string())),
    }
}
