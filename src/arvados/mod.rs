//! The Arvados controller client: the container queries, lock, unlock and cancel the dispatcher
//! uses, and the container update the stand-in crunch-run makes.
//!
//! Requests follow the Go dispatcher exactly (reference-scheduler.md §4.2, §4.4, §4.5): list
//! parameters go in the query string with sorted keys, arrays and objects as JSON, `offset=0`
//! omitted; a query of 1000 characters or more becomes a `POST` with
//! `X-Http-Method-Override: GET` and a form body; `PUT` parameters go in a form body; a request
//! whose response is not used adds `select=["uuid"]`.
//!
//! Invariants: the token is sent only in the `Authorization: Bearer` header and never appears in
//! `Debug` output, logs or errors; every failure is an [`Error`] that names the request and keeps
//! the HTTP status, so [`Client::execute`] can hand the core an [`ApiError`] whose status shows a
//! 503 (§4.9). Requests pass through the §4.9 concurrency limiter ([`limiter`]), which also
//! remembers the last 503. Nothing here panics on a bad response.

pub mod limiter;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, Url};
use serde_json::{Value, json};

use crate::core::command::{
    ApiError, Command, CommandKind, ContainerUpdate, Input, PollResult, Tracked, poll_missing,
};
use crate::core::types::Container;

pub use wire::{ContainerList, POLL_SELECT, WireContainer};

/// Page size of the "mine" and "avail" lists.
pub const PAGE_LIMIT: i64 = 1000;
/// Go's `queuedContainersTarget`: "avail" paging stops once this many non-supervisors arrived.
pub const QUEUED_TARGET: usize = 100;
/// Batch size of the `missing` re-fetch.
pub const MISSING_BATCH: usize = 20;
/// A GET whose encoded query is at least this long is sent as a POST with a method override.
pub const MAX_GET_QUERY: usize = 1000;
/// Upper bound on pages per list, so a misbehaving server cannot keep a poll looping.
pub const MAX_PAGES: usize = 10_000;
/// Mounts requests in flight at once during a poll.
const MOUNTS_CONCURRENCY: usize = 8;
/// Default per-request timeout (Go's client default is five minutes).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// A controller call failure. Messages name the request; none contains the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The controller URL cannot be used.
    #[error("controller URL {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Build(String),
    /// The server answered with a non-success status.
    #[error("{method} {path}: HTTP {status}: {message}")]
    Status {
        /// Method.
        method: String,
        /// Path below the controller URL.
        path: String,
        /// HTTP status.
        status: u16,
        /// The error text of the response.
        message: String,
    },
    /// No usable response (connection refused, reset, TLS failure...).
    #[error("{method} {path}: {message}")]
    Transport {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// What happened.
        message: String,
    },
    /// The request did not finish in time.
    #[error("{what}: timed out after {after:?}")]
    Timeout {
        /// The request or operation.
        what: String,
        /// The limit.
        after: Duration,
    },
    /// The response body is not what the request expects.
    #[error("{method} {path}: bad response: {message}")]
    Decode {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The server returned records the filters exclude (§4.2).
    #[error(
        "BUG? server response did not match requested filters, erroring out rather than risk deadlock: {uuid}"
    )]
    FilterMismatch {
        /// The unexpected UUID.
        uuid: String,
    },
    /// A list kept returning pages past the limit.
    #[error("{what}: more than {pages} pages; giving up")]
    TooManyPages {
        /// The list.
        what: String,
        /// The page limit.
        pages: usize,
    },
}

impl Error {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The core's view of this failure.
    pub fn to_api_error(&self) -> ApiError {
        ApiError {
            status: self.status(),
            message: self.to_string(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        e.to_api_error()
    }
}

/// Query or form parameters, kept sorted by key as Go's `url.Values.Encode` sends them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// No parameters.
    pub fn new() -> Params {
        Params::default()
    }

    /// Adds a parameter: strings raw, numbers raw, arrays and objects as JSON; `false` and null
    /// are omitted, and so is `offset=0`.
    pub fn set(&mut self, key: &str, v: Value) -> &mut Params {
        let text = match v {
            Value::Null | Value::Bool(false) => return self,
            Value::Bool(true) => "true".to_string(),
            Value::String(s) => s,
            Value::Number(n) => {
                if key == "offset" && n.as_i64() == Some(0) {
                    return self;
                }
                n.to_string()
            }
            other => other.to_string(),
        };
        self.0.insert(key.to_string(), text);
        self
    }

    /// The `application/x-www-form-urlencoded` encoding.
    pub fn encode(&self) -> String {
        let mut u = Url::parse("http://x/").expect("a constant URL parses");
        {
            let mut q = u.query_pairs_mut();
            for (k, v) in &self.0 {
                q.append_pair(k, v);
            }
        }
        u.query().unwrap_or("").to_string()
    }
}

/// The parameters of one container list page.
#[derive(Clone, Debug, PartialEq)]
pub struct ListParams {
    /// Filters, as the API's JSON array of triples.
    pub filters: Value,
    /// Ordering (`uuid` or `priority desc`).
    pub order: String,
    /// Page size; `None` leaves the server default.
    pub limit: Option<i64>,
    /// Offset paging.
    pub offset: i64,
    /// Selected fields.
    pub select: Vec<String>,
}

impl ListParams {
    fn to_params(&self) -> Params {
        let mut p = Params::new();
        p.set("count", json!("none"))
            .set("filters", self.filters.clone())
            .set("order", json!(self.order))
            .set("offset", json!(self.offset))
            .set("select", json!(self.select));
        if let Some(l) = self.limit {
            p.set("limit", json!(l));
        }
        p
    }
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    auth: HeaderValue,
    insecure: bool,
    request_timeout: Duration,
    token_uuid: tokio::sync::OnceCell<String>,
    limiter: limiter::Limiter,
}

/// A controller client. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.inner.base.as_str())
            .field("insecure", &self.inner.insecure)
            .field("token", &"[redacted]")
            .finish()
    }
}

/// Accepts any server certificate (`ARVADOS_API_HOST_INSECURE` / `TLS.Insecure`).
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(insecure: bool) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Build(format!("TLS protocol versions: {e}")))?;
    let mut cfg = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "error loading a system root certificate");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "loaded system root certificates");
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A container update the stand-in crunch-run and the dispatcher send (`PUT`).
pub type Fields = serde_json::Map<String, Value>;

impl Client {
    /// A client for the controller at `controller_url` (`https://host[:port]`, or `http://` for
    /// a local stand-in) authenticating with `token`. `insecure` skips certificate checks.
    pub fn new(controller_url: &str, token: &str, insecure: bool) -> Result<Client, Error> {
        Client::with_timeout(controller_url, token, insecure, DEFAULT_REQUEST_TIMEOUT)
    }

    /// Like [`Client::new`], with a per-request timeout.
    pub fn with_timeout(
        controller_url: &str,
        token: &str,
        insecure: bool,
        request_timeout: Duration,
    ) -> Result<Client, Error> {
        let bad = |reason: &str| Error::BadUrl {
            url: controller_url.to_string(),
            reason: reason.to_string(),
        };
        let mut base = Url::parse(controller_url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("scheme must be http or https"));
        }
        if base.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(bad("credentials in the URL are not supported"));
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        base.set_query(None);
        base.set_fragment(None);
        if token.is_empty() {
            return Err(Error::Build("the API token is empty".into()));
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Error::Build("the API token is not a valid header value".into()))?;
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(insecure)?)
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(30)))
            .build()
            .map_err(|e| Error::Build(e.to_string()))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                auth,
                insecure,
                request_timeout,
                token_uuid: tokio::sync::OnceCell::new(),
                limiter: limiter::Limiter::default(),
            }),
        })
    }

    /// When the controller last answered 503 (reference-scheduler.md §4.9).
    pub fn last_503(&self) -> Option<std::time::SystemTime> {
        self.inner.limiter.last_503()
    }

    /// The current concurrent-request limit (§4.9).
    pub fn concurrency_limit(&self) -> usize {
        self.inner.limiter.limit()
    }

    /// The `APIHost` crunch-run gets in ConfigData: `host[:port]` of an HTTPS controller URL.
    /// A plain-HTTP controller (only the loopback stand-in, `dispatch-sim controller`) keeps
    /// its `http://` scheme, which `crunch-run-standin` understands; the real crunch-run
    /// always speaks HTTPS.
    pub fn api_host(&self) -> String {
        let b = &self.inner.base;
        let host = b.host_str().unwrap_or("");
        let hostport = match b.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        if b.scheme() == "http" {
            format!("http://{hostport}")
        } else {
            hostport
        }
    }

    /// Whether certificate checks are off (`ARVADOS_API_HOST_INSECURE`).
    pub fn insecure(&self) -> bool {
        self.inner.insecure
    }

    /// The controller base URL.
    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    /// One request; returns the parsed JSON body of a 2xx answer. `params` go in the query
    /// string for GET (or the form body when too long) and in the form body otherwise.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        params: &Params,
    ) -> Result<Value, Error> {
        let mut url = self.inner.base.join(path).map_err(|e| Error::BadUrl {
            url: format!("{}{path}", self.inner.base),
            reason: e.to_string(),
        })?;
        let encoded = params.encode();
        let mname = method.as_str().to_string();
        let mut req = if method == Method::GET {
            if encoded.len() >= MAX_GET_QUERY {
                self.inner
                    .http
                    .post(url)
                    .header("X-Http-Method-Override", "GET")
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(encoded)
            } else {
                if !encoded.is_empty() {
                    url.set_query(Some(&encoded));
                }
                self.inner.http.get(url)
            }
        } else {
            self.inner
                .http
                .request(method, url)
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(encoded)
        };
        req = req.header(AUTHORIZATION, self.inner.auth.clone());
        let what = || (mname.clone(), path.to_string());
        let permit = self.inner.limiter.acquire().await;
        let sent = req.send().await;
        self.inner
            .limiter
            .report(sent.as_ref().ok().map(|r| r.status().as_u16()));
        let resp = sent.map_err(|e| {
            let (method, path) = what();
            if e.is_timeout() {
                Error::Timeout {
                    what: format!("{method} {path}"),
                    after: self.inner.request_timeout,
                }
            } else {
                Error::Transport {
                    method,
                    path,
                    message: transport_message(&e),
                }
            }
        })?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| {
            let (method, path) = what();
            Error::Transport {
                method,
                path,
                message: format!("reading the response: {}", transport_message(&e)),
            }
        })?;
        drop(permit);
        if !status.is_success() {
            let (method, path) = what();
            return Err(Error::Status {
                method,
                path,
                status: status.as_u16(),
                message: wire::error_message(&body),
            });
        }
        serde_json::from_str(&body).map_err(|e| {
            let (method, path) = what();
            Error::Decode {
                method,
                path,
                message: e.to_string(),
            }
        })
    }

    fn decode<T: serde::de::DeserializeOwned>(
        method: &str,
        path: &str,
        v: Value,
    ) -> Result<T, Error> {
        serde_json::from_value(v).map_err(|e| Error::Decode {
            method: method.to_string(),
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// The UUID of the client's own token (`GET arvados/v1/api_client_authorizations/current`),
    /// fetched once.
    pub async fn token_uuid(&self) -> Result<String, Error> {
        self.inner
            .token_uuid
            .get_or_try_init(|| async {
                let path = "arvados/v1/api_client_authorizations/current";
                let v = self.request(Method::GET, path, &Params::new()).await?;
                match v.get("uuid").and_then(Value::as_str) {
                    Some(u) if !u.is_empty() => Ok(u.to_string()),
                    _ => Err(Error::Decode {
                        method: "GET".into(),
                        path: path.into(),
                        message: "no uuid in the token record".into(),
                    }),
                }
            })
            .await
            .cloned()
    }

    /// One page of `GET arvados/v1/containers`.
    pub async fn list_containers(&self, lp: &ListParams) -> Result<ContainerList, Error> {
        let path = "arvados/v1/containers";
        let v = self.request(Method::GET, path, &lp.to_params()).await?;
        Client::decode("GET", path, v)
    }

    /// Every page of a uuid-ordered list, keyset-paged: each page after the first adds
    /// `["uuid",">",<last uuid>]` to the original filters; the first empty page ends it.
    pub async fn list_all_by_uuid(
        &self,
        filters: &[Value],
        limit: Option<i64>,
    ) -> Result<Vec<WireContainer>, Error> {
        let mut out = Vec::new();
        let mut last: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut f = filters.to_vec();
            if let Some(l) = &last {
                f.push(json!(["uuid", ">", l]));
            }
            let page = self
                .list_containers(&ListParams {
                    filters: Value::Array(f),
                    order: "uuid".into(),
                    limit,
                    offset: 0,
                    select: POLL_SELECT.iter().map(|s| s.to_string()).collect(),
                })
                .await?;
            let Some(tail) = page.items.last() else {
                return Ok(out);
            };
            if last.as_deref().is_some_and(|l| tail.uuid.as_str() <= l) {
                return Err(Error::Decode {
                    method: "GET".into(),
                    path: "arvados/v1/containers".into(),
                    message: format!("keyset page did not advance past {:?}", tail.uuid),
                });
            }
            last = Some(tail.uuid.clone());
            out.extend(page.items);
        }
        Err(Error::TooManyPages {
            what: format!("containers list {}", Value::Array(filters.to_vec())),
            pages: MAX_PAGES,
        })
    }

    /// The "avail" list: Queued with priority > "0", by priority descending, offset-paged,
    /// until an empty page or until [`QUEUED_TARGET`] non-supervisors have arrived.
    pub async fn list_avail(&self) -> Result<Vec<WireContainer>, Error> {
        let mut out = Vec::new();
        let mut offset = 0i64;
        let mut non_supervisors = 0usize;
        for _ in 0..MAX_PAGES {
            let page = self
                .list_containers(&ListParams {
                    filters: json!([["state", "=", "Queued"], ["priority", ">", "0"]]),
                    order: "priority desc".into(),
                    limit: Some(PAGE_LIMIT),
                    offset,
                    select: POLL_SELECT.iter().map(|s| s.to_string()).collect(),
                })
                .await?;
            if page.items.is_empty() {
                return Ok(out);
            }
            offset += page.items.len() as i64;
            non_supervisors += page
                .items
                .iter()
                .filter(|c| {
                    !c.scheduling_parameters
                        .as_ref()
                        .is_some_and(|s| s.supervisor)
                })
                .count();
            out.extend(page.items);
            if non_supervisors >= QUEUED_TARGET {
                return Ok(out);
            }
        }
        Err(Error::TooManyPages {
            what: "queued containers list".into(),
            pages: MAX_PAGES,
        })
    }

    /// `GET arvados/v1/containers/<uuid>`, optionally with `select`.
    pub async fn get_container(&self, uuid: &str, select: Option<&[&str]>) -> Result<Value, Error> {
        let mut p = Params::new();
        if let Some(s) = select {
            p.set("select", json!(s));
        }
        self.request(Method::GET, &format!("arvados/v1/containers/{uuid}"), &p)
            .await
    }

    /// The mounts of one container (`select=["mounts"]`), as the error text the core expects
    /// on failure.
    async fn mounts(
        &self,
        uuid: String,
    ) -> (
        String,
        Result<BTreeMap<String, crate::core::types::Mount>, String>,
    ) {
        let r = match self.get_container(&uuid, Some(&["mounts"])).await {
            Ok(v) => wire::decode_mounts(&uuid, v.get("mounts").unwrap_or(&Value::Null)),
            Err(e) => Err(e.to_string()),
        };
        (uuid, r)
    }

    /// One queue poll (reference-scheduler.md §4.2): "avail" and "mine", the re-fetch of the
    /// unfinished `tracked` containers the lists did not return, in batches of 20, and mounts
    /// for every returned container not tracked. "avail" records come first, so the core keeps
    /// them over "mine" duplicates.
    pub async fn poll(&self, tracked: &[Tracked]) -> Result<PollResult, Error> {
        let me = self.token_uuid().await?;
        // The two lists run concurrently, as in Go.
        let mine_filters = [json!(["locked_by_uuid", "=", me])];
        let (avail, mine) = tokio::try_join!(
            self.list_avail(),
            self.list_all_by_uuid(&mine_filters, Some(PAGE_LIMIT))
        )?;
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut records: Vec<WireContainer> = Vec::new();
        for c in avail.into_iter().chain(mine) {
            if seen.insert(c.uuid.clone()) {
                records.push(c);
            }
        }
        let mut result = PollResult::default();
        let mut want: BTreeSet<String> = poll_missing(tracked)
            .filter(|u| !seen.contains(*u))
            .map(str::to_string)
            .collect();
        let mut rounds = 0usize;
        while !want.is_empty() {
            rounds += 1;
            if rounds > MAX_PAGES {
                return Err(Error::TooManyPages {
                    what: "missing containers re-fetch".into(),
                    pages: MAX_PAGES,
                });
            }
            let batch: Vec<String> = want.iter().take(MISSING_BATCH).cloned().collect();
            let got = self
                .list_all_by_uuid(&[json!(["uuid", "in", batch])], None)
                .await?;
            if got.is_empty() {
                for u in &batch {
                    tracing::warn!(container = %u, "container not returned by the controller; treating it as deleted");
                    want.remove(u);
                    result.deleted.push(u.clone());
                }
                continue;
            }
            for c in got {
                if !want.remove(&c.uuid) {
                    return Err(Error::FilterMismatch { uuid: c.uuid });
                }
                if seen.insert(c.uuid.clone()) {
                    records.push(c);
                }
            }
        }
        let mut containers: Vec<Container> = Vec::with_capacity(records.len());
        for r in &records {
            containers.push(r.to_container().map_err(|e| Error::Decode {
                method: "GET".into(),
                path: "arvados/v1/containers".into(),
                message: e.to_string(),
            })?);
        }
        let known: BTreeSet<&str> = tracked.iter().map(|c| c.uuid.as_str()).collect();
        let new: Vec<usize> = containers
            .iter()
            .enumerate()
            .filter(|(_, c)| !known.contains(c.uuid.as_str()))
            .map(|(i, _)| i)
            .collect();
        let index: BTreeMap<String, usize> = new
            .iter()
            .map(|&i| (containers[i].uuid.to_string(), i))
            .collect();
        let mut set = tokio::task::JoinSet::new();
        let mut next = new.iter();
        loop {
            while set.len() < MOUNTS_CONCURRENCY {
                let Some(&i) = next.next() else { break };
                let c = self.clone();
                let uuid = containers[i].uuid.to_string();
                set.spawn(async move { c.mounts(uuid).await });
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            let (uuid, r) = joined.map_err(|e| Error::Transport {
                method: "GET".into(),
                path: "arvados/v1/containers/<uuid>".into(),
                message: format!("mounts task failed: {e}"),
            })?;
            match r {
                Ok(m) => {
                    if let Some(&i) = index.get(&uuid) {
                        containers[i].mounts = Some(m);
                    }
                }
                Err(e) => result.mounts_errors.push((uuid, e)),
            }
        }
        result.mounts_errors.sort();
        result.containers = containers.into_iter().map(std::sync::Arc::new).collect();
        Ok(result)
    }

    async fn container_update(
        &self,
        path: String,
        method: Method,
        p: &Params,
    ) -> Result<ContainerUpdate, Error> {
        let v = self.request(method.clone(), &path, p).await?;
        let w: WireContainer = Client::decode(method.as_str(), &path, v)?;
        w.to_update().map_err(|e| Error::Decode {
            method: method.as_str().to_string(),
            path,
            message: e.to_string(),
        })
    }

    /// `POST arvados/v1/containers/<uuid>/lock`.
    pub async fn lock(&self, uuid: &str) -> Result<ContainerUpdate, Error> {
        self.container_update(
            format!("arvados/v1/containers/{uuid}/lock"),
            Method::POST,
            &Params::new(),
        )
        .await
    }

    /// `POST arvados/v1/containers/<uuid>/unlock`.
    pub async fn unlock(&self, uuid: &str) -> Result<ContainerUpdate, Error> {
        self.container_update(
            format!("arvados/v1/containers/{uuid}/unlock"),
            Method::POST,
            &Params::new(),
        )
        .await
    }

    /// `PUT arvados/v1/containers/<uuid>` with `container={"state":"Cancelled"}`.
    pub async fn cancel(&self, uuid: &str) -> Result<ContainerUpdate, Error> {
        let mut p = Params::new();
        p.set("container", json!({"state": "Cancelled"}));
        self.container_update(format!("arvados/v1/containers/{uuid}"), Method::PUT, &p)
            .await
    }

    /// `PUT arvados/v1/containers/<uuid>` with `container=<fields>`; returns the record.
    pub async fn update_container(&self, uuid: &str, fields: Fields) -> Result<Value, Error> {
        let mut p = Params::new();
        p.set("container", Value::Object(fields));
        self.request(Method::PUT, &format!("arvados/v1/containers/{uuid}"), &p)
            .await
    }

    /// A `PUT` whose response is not used: `select=["uuid"]` is added, as in Go.
    async fn update_discarding(&self, uuid: &str, fields: Value) -> Result<(), Error> {
        let mut p = Params::new();
        p.set("container", fields).set("select", json!(["uuid"]));
        self.request(Method::PUT, &format!("arvados/v1/containers/{uuid}"), &p)
            .await
            .map(|_| ())
    }

    /// Cancels a container no instance type fits (§4.4): lock it first if `lock_first`, set
    /// `runtime_status.error`, then set state Cancelled. If a step fails but the container is
    /// already Cancelled, the race was lost quietly and the result is success.
    pub async fn cancel_unsatisfiable(
        &self,
        uuid: &str,
        lock_first: bool,
        message: &str,
    ) -> Result<(), Error> {
        if lock_first {
            self.lock(uuid).await?;
        }
        let r = match self
            .update_discarding(uuid, json!({"runtime_status": {"error": message}}))
            .await
        {
            Ok(()) => {
                self.update_discarding(uuid, json!({"state": "Cancelled"}))
                    .await
            }
            Err(e) => Err(e),
        };
        let Err(e) = r else { return Ok(()) };
        match self.get_container(uuid, Some(&["uuid", "state"])).await {
            Ok(v) if v.get("state").and_then(Value::as_str) == Some("Cancelled") => Ok(()),
            _ => {
                tracing::warn!(container = %uuid, error = %e, "error cancelling container as unsatisfiable");
                Err(e)
            }
        }
    }

    /// Carries out an API command of the core within `timeout` and returns its completion;
    /// `None` for a command that is not an API command.
    pub async fn execute(&self, cmd: &Command, timeout: Duration) -> Option<Input> {
        let op = cmd.op;
        let within = |what: String| {
            move |_| ApiError {
                status: None,
                message: Error::Timeout {
                    what,
                    after: timeout,
                }
                .to_string(),
            }
        };
        Some(match &cmd.kind {
            CommandKind::PollQueue { tracked } => Input::QueuePolled {
                op,
                result: tokio::time::timeout(timeout, self.poll(tracked))
                    .await
                    .map_err(within("queue poll".into()))
                    .and_then(|r| r.map_err(ApiError::from)),
            },
            CommandKind::Lock { uuid } => Input::ContainerUpdated {
                op,
                result: tokio::time::timeout(timeout, self.lock(uuid))
                    .await
                    .map_err(within(format!("lock {uuid}")))
                    .and_then(|r| r.map_err(ApiError::from)),
            },
            CommandKind::Unlock { uuid } => Input::ContainerUpdated {
                op,
                result: tokio::time::timeout(timeout, self.unlock(uuid))
                    .await
                    .map_err(within(format!("unlock {uuid}")))
                    .and_then(|r| r.map_err(ApiError::from)),
            },
            CommandKind::Cancel { uuid } => Input::ContainerUpdated {
                op,
                result: tokio::time::timeout(timeout, self.cancel(uuid))
                    .await
                    .map_err(within(format!("cancel {uuid}")))
                    .and_then(|r| r.map_err(ApiError::from)),
            },
            CommandKind::CancelUnsatisfiable {
                uuid,
                lock_first,
                message,
            } => Input::UnsatisfiableCancelled {
                op,
                result: tokio::time::timeout(
                    timeout,
                    self.cancel_unsatisfiable(uuid, *lock_first, message),
                )
                .await
                .map_err(within(format!("cancel unsatisfiable {uuid}")))
                .and_then(|r| r.map_err(ApiError::from)),
            },
            _ => return None,
        })
    }
}

/// A reqwest error with its causes, without the URL (which is named separately).
fn transport_message(e: &reqwest::Error) -> String {
    let mut msg = e.without_url_ref_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

trait WithoutUrl {
    fn without_url_ref_string(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref_string(&self) -> String {
        if self.is_connect() {
            "connection failed".to_string()
        } else if self.is_timeout() {
            "timed out".to_string()
        } else if self.is_decode() {
            "could not decode the response".to_string()
        } else if self.is_body() {
            "body error".to_string()
        } else {
            "request failed".to_string()
        }
    }
}
