//! The management API's command-line client: `instance list|hold|drain|run|kill` and
//! `container list|kill` (reference-scheduler.md §6, "Who uses it").
//!
//! Invariants: list output is tab-separated with `-` for an empty field and the price as `%f`;
//! each action request reports `<id>: <HTTP status> (<host>)` on the error stream; an ID that got
//! a 200 from one dispatcher is not sent to the next; the exit status is 0 when every ID got a
//! 200, 1 otherwise, and 2 when no ID was given. The token is sent only in the `Authorization`
//! header and never printed.

use std::fmt;
use std::io::Write;
use std::time::Duration;

use serde_json::Value;

/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: a request failed (or some ID got no 200).
pub const EXIT_FAILED: u8 = 1;
/// Exit status: usage error (no IDs).
pub const EXIT_USAGE: u8 = 2;

/// A management token whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token.
    pub fn new(s: impl Into<String>) -> Token {
        Token(s.into())
    }

    /// The token itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl std::str::FromStr for Token {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Token, Self::Err> {
        Ok(Token(s.to_string()))
    }
}

/// A client for one or more dispatchers.
pub struct AdminClient {
    urls: Vec<String>,
    token: Token,
    http: reqwest::Client,
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("urls", &self.urls)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// A failure that ends a list command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
    /// A request failed before a response arrived.
    #[error("error doing API request to {url}: {message}")]
    Request {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// A response other than 200.
    #[error("{url}: {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// `<code> <reason>`.
        status: String,
        /// The start of the body.
        body: String,
    },
    /// A 200 whose body is not the expected JSON.
    #[error("error decoding API response from {url}: {message}")]
    Decode {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// `host[:port]` of a URL, as Go's `url.Host` (no scheme, user info or path).
pub fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.rsplit_once('@').map_or(authority, |(_, h)| h)
}

/// `url` without trailing slashes, followed by `path`.
fn join(url: &str, path: &str) -> String {
    format!("{}{path}", url.trim_end_matches('/'))
}

/// Go's `%f`: six decimals.
fn go_f(v: f64) -> String {
    format!("{v:.6}")
}

/// The string at `v[key]`, or `-` when it is missing or empty.
fn field(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => "-".into(),
    }
}

/// A status line's `<code> <reason>`, as Go's `resp.Status`.
fn status_text(s: reqwest::StatusCode) -> String {
    match s.canonical_reason() {
        Some(r) => format!("{} {r}", s.as_u16()),
        None => s.as_u16().to_string(),
    }
}

/// One `instance list` row.
pub fn instance_row(i: &Value) -> String {
    let running = match i["running_container_uuids"].as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|u| u.as_str().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    };
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        field(i, "instance"),
        field(i, "address"),
        field(i, "worker_state"),
        field(i, "idle_behavior"),
        field(i, "arvados_instance_type"),
        field(i, "provider_instance_type"),
        go_f(i["price"].as_f64().unwrap_or(0.0)),
        running
    )
}

/// The `instance list -header` line.
pub const INSTANCE_HEADER: &str = "instance\taddress\tstate\tidle-behavior\tconfig-type\tprovider-type\tprice\trunning-containers";

/// One `container list` row: UUID, state, priority, the first eligible provider type, when the
/// dispatcher first saw it and its scheduling status.
pub fn container_row(item: &Value) -> String {
    let c = &item["container"];
    let first_type = item["instance_types"]
        .as_array()
        .and_then(|a| a.first())
        .map_or_else(|| "-".to_string(), |t| field(t, "ProviderType"));
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}",
        field(c, "uuid"),
        field(c, "state"),
        field(c, "priority"),
        first_type,
        field(item, "first_seen_at"),
        field(item, "scheduling_status"),
    )
}

/// The `container list -header` line.
pub const CONTAINER_HEADER: &str =
    "container\tstate\tpriority\tprovider-type\tfirst-seen\tscheduling-status";

impl AdminClient {
    /// A client for the dispatchers at `urls` (their base URLs). A rustls crypto provider must
    /// be installed (see [`install_crypto_provider`]).
    pub fn new(urls: Vec<String>, token: Token) -> Result<AdminClient, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(AdminClient { urls, token, http })
    }

    /// The `items` of a GET on every dispatcher, concatenated.
    async fn items(&self, path: &str) -> Result<Vec<Value>, ClientError> {
        let mut all = Vec::new();
        for base in &self.urls {
            let url = join(base, path);
            let resp = self
                .http
                .get(&url)
                .bearer_auth(self.token.expose())
                .send()
                .await
                .map_err(|e| ClientError::Request {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            let status = resp.status();
            let body = resp.text().await.map_err(|e| ClientError::Request {
                url: url.clone(),
                message: e.to_string(),
            })?;
            if status != reqwest::StatusCode::OK {
                return Err(ClientError::Status {
                    url,
                    status: status_text(status),
                    body: body.trim().chars().take(200).collect(),
                });
            }
            let v: Value = serde_json::from_str(&body).map_err(|e| ClientError::Decode {
                url: url.clone(),
                message: e.to_string(),
            })?;
            match &v["items"] {
                Value::Array(a) => all.extend(a.iter().cloned()),
                Value::Null => {}
                _ => {
                    return Err(ClientError::Decode {
                        url,
                        message: "\"items\" is neither a list nor null".into(),
                    });
                }
            }
        }
        Ok(all)
    }

    /// `instance list [-header]`: writes the rows to `out`.
    pub async fn list_instances(
        &self,
        header: bool,
        out: &mut dyn Write,
    ) -> Result<(), ClientError> {
        // As Go does, the headings come first, even if a request then fails.
        if header {
            let _ = writeln!(out, "{INSTANCE_HEADER}");
        }
        let items = self.items("/arvados/v1/dispatch/instances").await?;
        let mut text = String::new();
        for i in &items {
            text.push_str(&instance_row(i));
            text.push('\n');
        }
        let _ = out.write_all(text.as_bytes());
        Ok(())
    }

    /// `container list [-header]`: writes the rows to `out`.
    pub async fn list_containers(
        &self,
        header: bool,
        out: &mut dyn Write,
    ) -> Result<(), ClientError> {
        // As Go does, the headings come first, even if a request then fails.
        if header {
            let _ = writeln!(out, "{CONTAINER_HEADER}");
        }
        let items = self.items("/arvados/v1/dispatch/containers").await?;
        let mut text = String::new();
        for i in &items {
            text.push_str(&container_row(i));
            text.push('\n');
        }
        let _ = out.write_all(text.as_bytes());
        Ok(())
    }

    /// POSTs `path` with `<id_param>=<id>` (and `reason`, when given) for every ID on every
    /// dispatcher until it gets a 200, reporting each response on `err`. Returns the exit status.
    pub async fn act(
        &self,
        path: &str,
        id_param: &str,
        ids: &[String],
        reason: Option<&str>,
        err: &mut dyn Write,
    ) -> u8 {
        let mut todo: Vec<&String> = Vec::new();
        for id in ids {
            if !todo.contains(&id) {
                todo.push(id);
            }
        }
        for base in &self.urls {
            let url = join(base, path);
            let host = url_host(base);
            let mut left = Vec::new();
            for id in todo {
                let mut form: Vec<(&str, &str)> = vec![(id_param, id.as_str())];
                if let Some(r) = reason {
                    form.push(("reason", r));
                }
                let resp = self
                    .http
                    .post(&url)
                    .bearer_auth(self.token.expose())
                    .query(&form)
                    .send()
                    .await;
                match resp {
                    Ok(resp) => {
                        let _ = writeln!(err, "{id}: {} ({host})", status_text(resp.status()));
                        if resp.status() != reqwest::StatusCode::OK {
                            left.push(id);
                        }
                    }
                    Err(e) => {
                        let _ = writeln!(err, "{id}: error doing API request: {e} ({host})");
                        left.push(id);
                    }
                }
            }
            todo = left;
        }
        if todo.is_empty() {
            EXIT_OK
        } else {
            EXIT_FAILED
        }
    }
}

/// Installs ring as the process's rustls crypto provider (reqwest is built without one). A
/// second call is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every `Services.DispatchCloud.InternalURLs` key of the cluster `cluster_id` in the config
/// text, in file order. The config loader keeps only the first; the CLI talks to all of them.
pub fn dispatch_internal_urls(config_text: &str, cluster_id: &str) -> Vec<String> {
    let Ok(mut root) = serde_yaml::from_str::<serde_yaml::Value>(config_text) else {
        return Vec::new();
    };
    if root.apply_merge().is_err() {
        return Vec::new();
    }
    let Some(clusters) = root.get("Clusters").and_then(|c| c.as_mapping()) else {
        return Vec::new();
    };
    let cluster = clusters
        .get(cluster_id)
        .or_else(|| clusters.values().next());
    cluster
        .and_then(|c| c.get("Services"))
        .and_then(|s| s.get("DispatchCloud"))
        .and_then(|s| s.get("InternalURLs"))
        .and_then(|u| u.as_mapping())
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str())
                .filter(|k| !k.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_use_dashes_and_go_price_format() {
        let i = json!({
            "instance": "", "address": "", "price": 0.096, "arvados_instance_type": "m5large",
            "provider_instance_type": "m5.large", "last_container_uuid": "",
            "last_busy": "0001-01-01T00:00:00Z", "running_container_uuids": null,
            "worker_state": "booting", "idle_behavior": "run"
        });
        assert_eq!(
            instance_row(&i),
            "-\t-\tbooting\trun\tm5large\tm5.large\t0.096000\t-"
        );
        let i = json!({
            "instance": "i-1", "address": "10.0.0.1", "price": 1.5, "arvados_instance_type": "",
            "provider_instance_type": "x", "running_container_uuids": ["a", "b"],
            "worker_state": "running", "idle_behavior": "hold"
        });
        assert_eq!(
            instance_row(&i),
            "i-1\t10.0.0.1\trunning\thold\t-\tx\t1.500000\ta,b"
        );
    }

    #[test]
    fn hosts_and_urls() {
        assert_eq!(
            url_host("http://dispatch.internal:9006/"),
            "dispatch.internal:9006"
        );
        assert_eq!(url_host("https://u:p@h/x"), "h");
        assert_eq!(
            join("http://h:9006/", "/arvados/v1/dispatch/instances"),
            "http://h:9006/arvados/v1/dispatch/instances"
        );
    }

    #[test]
    fn internal_urls_from_config() {
        let text = "Clusters:\n  zzzzz:\n    Services:\n      DispatchCloud:\n        InternalURLs:\n          \"http://a:9006/\": {}\n          \"http://b:9006\": {}\n";
        assert_eq!(
            dispatch_internal_urls(text, "zzzzz"),
            ["http://a:9006/", "http://b:9006"]
        );
        assert!(dispatch_internal_urls("Clusters: {}", "zzzzz").is_empty());
        assert!(dispatch_internal_urls(": :", "zzzzz").is_empty());
    }

    #[test]
    fn token_is_never_shown() {
        let t = Token::new("sekrit");
        assert!(!format!("{t:?}").contains("sekrit"));
    }
}
