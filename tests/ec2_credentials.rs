//! The EC2 driver's credentials (reference-workers.md §6.2: the static DriverParameters keys if
//! set, otherwise the SDK's default chain): the instance role from a fake IMDSv2 on 127.0.0.1,
//! a named profile of a shared credentials file picked by `AWS_PROFILE`, the default profile
//! under `$HOME/.aws`, the environment, static keys winning over all of them, and a request
//! with no credentials anywhere. Each case checks the signature on the request the EC2 endpoint
//! (the recorded-XML server of tests/support/ec2_fixture.rs) receives: `Authorization` names
//! the access key ID (`Credential=<id>/`) and `X-Amz-Security-Token` carries the session token.
//!
//! The chain reads the process environment and `$HOME`, so each case runs the driver in a child
//! process: this test binary re-executed with `<test name> --exact --nocapture` and an
//! environment that is exactly PATH, a scratch HOME, the case's variables and
//! [`CASE_VAR`] naming the test (no `std::env::set_var` in threaded tests, and nothing from the
//! developer's own `~/.aws` or `AWS_*` variables leaks in). The parent runs the loopback servers
//! and checks what they received. Every child points IMDS at 127.0.0.1, so nothing reaches
//! 169.254.169.254. The child logs at debug level, and no secret may appear in its output.
#![cfg(feature = "ec2")]

#[path = "support/ec2_fixture.rs"]
mod ec2_fixture;
#[path = "support/sshd.rs"]
mod sshd;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arvados_dispatch_cloud::cloud::ec2::Ec2;
use arvados_dispatch_cloud::cloud::{CloudErrorKind, InstanceSet};
use arvados_dispatch_cloud::core::price::rfc3339;
use arvados_dispatch_cloud::core::time::Timestamp;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ec2_fixture::{Call, FixtureServer, Loopback};
use sshd::{ScratchDir, free_port};

/// Names the test whose inner half a child process runs.
const CASE_VAR: &str = "ADC_EC2_CREDENTIALS_CASE";
/// The EC2 endpoint URL, for the child.
const ENDPOINT_VAR: &str = "ADC_EC2_CREDENTIALS_ENDPOINT";
/// What a child prints when its case passed (a filter that matched no test would exit 0 too).
const PASSED: &str = "ec2-credentials-case-passed";
/// A generous bound on each driver call and on each child.
const DEADLINE: Duration = Duration::from_secs(120);

/// The fake IMDS's session token, required on every metadata GET.
const IMDS_TOKEN: &str = "imds-session-token-0123456789";
/// The instance role name.
const ROLE: &str = "dispatch-role";
/// The instance role's credentials.
const IMDS_KEY_ID: &str = "ASIAIMDSFIXTURE00001";
const IMDS_SECRET: &str = "imdsSeCrEtAccessKey0123456789";
const IMDS_SESSION: &str = "imds-role-session-token-abcdef";

/// The profile file's credentials.
const DEFAULT_PROFILE_KEY_ID: &str = "AKIDDEFAULTPROFILE01";
const DEFAULT_PROFILE_SECRET: &str = "defaultProfileSeCrEt0123";
const NAMED_PROFILE_KEY_ID: &str = "AKIDNAMEDPROFILE0001";
const NAMED_PROFILE_SECRET: &str = "namedProfileSeCrEt0123";
const NAMED_PROFILE_SESSION: &str = "named-profile-session-token";

/// The environment's credentials.
const ENV_KEY_ID: &str = "AKIDENVIRONMENT00001";
const ENV_SECRET: &str = "environmentSeCrEt0123";

/// The static DriverParameters credentials.
const STATIC_KEY_ID: &str = "AKIDSTATICPARAMS0001";
const STATIC_SECRET: &str = "staticParamsSeCrEt0123";

/// Every secret above: none may appear in a child's output.
const SECRETS: &[&str] = &[
    IMDS_SECRET,
    IMDS_SESSION,
    IMDS_TOKEN,
    DEFAULT_PROFILE_SECRET,
    NAMED_PROFILE_SECRET,
    NAMED_PROFILE_SESSION,
    ENV_SECRET,
    STATIC_SECRET,
];

// ----- the fake IMDSv2 ----------------------------------------------------------------------

/// One request to the fake IMDS.
#[derive(Clone, Debug)]
struct ImdsCall {
    method: Method,
    path: String,
    /// `X-aws-ec2-metadata-token`.
    token: Option<String>,
    /// `X-aws-ec2-metadata-token-ttl-seconds`.
    ttl: Option<String>,
}

#[derive(Clone)]
struct ImdsShared {
    /// Whether the instance has a role (if not, the role list is a 404, as on EC2).
    has_role: bool,
    calls: Arc<Mutex<Vec<ImdsCall>>>,
}

/// A fake IMDSv2 on 127.0.0.1: `PUT /latest/api/token` returns a session token (the TTL header
/// is required), and the metadata GETs require it. `GET /test/requests` (not recorded) returns
/// how many requests it has had, so that a child can check that building a driver made none.
struct Imds {
    server: Loopback,
    calls: Arc<Mutex<Vec<ImdsCall>>>,
}

impl Imds {
    async fn start(has_role: bool) -> Imds {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let shared = ImdsShared {
            has_role,
            calls: calls.clone(),
        };
        let app = axum::Router::new().fallback(imds).with_state(shared);
        Imds {
            server: Loopback::serve(app).await,
            calls,
        }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn calls(&self) -> Vec<ImdsCall> {
        self.calls.lock().expect("calls lock").clone()
    }
}

async fn imds(
    State(s): State<ImdsShared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    if path == "/test/requests" {
        let n = s.calls.lock().expect("calls lock").len();
        return n.to_string().into_response();
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let call = ImdsCall {
        method: method.clone(),
        path: path.clone(),
        token: header("x-aws-ec2-metadata-token"),
        ttl: header("x-aws-ec2-metadata-token-ttl-seconds"),
    };
    s.calls.lock().expect("calls lock").push(call.clone());
    if method == Method::PUT && path == "/latest/api/token" {
        if call.ttl.is_none() {
            return StatusCode::BAD_REQUEST.into_response();
        }
        return (
            StatusCode::OK,
            [("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
            IMDS_TOKEN,
        )
            .into_response();
    }
    if method != Method::GET {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    if call.token.as_deref() != Some(IMDS_TOKEN) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let roles = "/latest/meta-data/iam/security-credentials/";
    match path.strip_prefix(roles) {
        Some("") if s.has_role => ROLE.into_response(),
        Some(role) if s.has_role && role == ROLE => {
            // Whole seconds, six hours ahead: well outside the driver's 5-minute window.
            let now_s = arvados_dispatch_cloud::runtime::wall_clock().as_millis() / 1000;
            let expires = rfc3339(Timestamp((now_s + 6 * 3600) * 1000));
            let updated = rfc3339(Timestamp(now_s * 1000));
            serde_json::json!({
                "Code": "Success",
                "LastUpdated": updated,
                "Type": "AWS-HMAC",
                "AccessKeyId": IMDS_KEY_ID,
                "SecretAccessKey": IMDS_SECRET,
                "Token": IMDS_SESSION,
                "Expiration": expires,
            })
            .to_string()
            .into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

// ----- parent and child ---------------------------------------------------------------------

/// The case this process runs as a child, if it is one.
fn child_case() -> Option<String> {
    std::env::var(CASE_VAR).ok()
}

/// What a child left behind.
struct ChildOutput {
    stdout: String,
    stderr: String,
}

/// Runs test `name` again in a child process of this binary whose environment is exactly PATH,
/// HOME = `home`, the EC2 endpoint, [`CASE_VAR`] and `env`. Asserts that it passed and that
/// none of [`SECRETS`] appears in its output.
async fn run_child(
    name: &str,
    home: &ScratchDir,
    endpoint: &str,
    env: &[(&str, String)],
) -> ChildOutput {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env_clear()
        .env("HOME", home.path())
        .env(CASE_VAR, name)
        .env(ENDPOINT_VAR, endpoint)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .expect("the child finished before the deadline")
        .expect("run the child test process");
    let child = ChildOutput {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        out.status.success() && child.stdout.contains(PASSED),
        "child {name} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        child.stdout,
        child.stderr
    );
    for secret in SECRETS {
        assert!(
            !child.stdout.contains(secret) && !child.stderr.contains(secret),
            "child {name} wrote the secret {secret:?}:\n--- stdout\n{}\n--- stderr\n{}",
            child.stdout,
            child.stderr
        );
    }
    child
}

/// In a child: logs everything at trace level to stderr through the service's own subscriber
/// (which caps other crates at debug), where the parent looks for secrets.
fn child_logging() {
    let _ = arvados_dispatch_cloud::runtime::logging::init(
        tracing_subscriber::EnvFilter::new("trace"),
        false,
    );
}

/// In a child: one listing by a driver without static keys (so through the default chain).
async fn child_lists_with_the_chain() {
    child_logging();
    child_list(&child_driver(serde_json::json!({}))).await;
    println!("{PASSED}");
}

/// Writes `~/.aws/credentials` under `home` with a `[default]` profile.
fn write_default_profile(home: &ScratchDir) {
    let aws = home.path().join(".aws");
    std::fs::create_dir_all(&aws).expect("mkdir .aws");
    std::fs::write(
        aws.join("credentials"),
        format!(
            "[default]\naws_access_key_id = {DEFAULT_PROFILE_KEY_ID}\naws_secret_access_key = {DEFAULT_PROFILE_SECRET}\n"
        ),
    )
    .expect("write ~/.aws/credentials");
}

/// In a child: a driver for the EC2 endpoint with `extra` DriverParameters.
fn child_driver(extra: serde_json::Value) -> Ec2 {
    let endpoint = std::env::var(ENDPOINT_VAR).expect("the parent sets the endpoint");
    let mut params = serde_json::json!({
        "Region": "us-east-1",
        "Endpoint": endpoint,
        "SubnetID": "subnet-a",
    });
    if let (Some(p), serde_json::Value::Object(e)) = (params.as_object_mut(), extra) {
        p.extend(e);
    }
    Ec2::from_driver_parameters(&params).expect("driver parameters")
}

/// In a child: lists, expecting the recorded empty listing.
async fn child_list(d: &Ec2) {
    let got = tokio::time::timeout(DEADLINE, d.list(&BTreeMap::new()))
        .await
        .expect("list finished before the deadline")
        .unwrap_or_else(|e| panic!("list failed: {e}"));
    assert!(got.is_empty(), "the recorded listing is empty: {got:?}");
}

/// The reply of the EC2 endpoint: the recorded empty listing.
fn empty_listing(_: &Call) -> (u16, String) {
    (200, "DescribeInstances-empty.xml".to_string())
}

/// Asserts that every request `server` received was signed with `key_id` and carried
/// `session` (or no session token), and returns how many there were.
fn assert_signed(server: &FixtureServer, key_id: &str, session: Option<&str>) -> usize {
    let calls = server.calls();
    for c in &calls {
        let auth = c.header("authorization").unwrap_or("");
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 ")
                && auth.contains(&format!("Credential={key_id}/")),
            "{} signed with {auth:?}, not {key_id}",
            c.action()
        );
        assert_eq!(c.header("x-amz-security-token"), session, "{}", c.action());
    }
    calls.len()
}

/// A raw HTTP/1.1 GET of `path` on the loopback `base` URL (`http://127.0.0.1:port`): the body.
fn http_get_body(base: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://").expect("an http:// URL");
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the fake IMDS");
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    buf.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .expect("a body")
}

// ----- cases --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_role_from_imds_signs_requests() {
    const NAME: &str = "instance_role_from_imds_signs_requests";
    if child_case().as_deref() == Some(NAME) {
        child_logging();
        let imds = std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT").expect("set by the parent");
        let d = child_driver(serde_json::json!({}));
        // Building the driver asked nothing.
        assert_eq!(http_get_body(&imds, "/test/requests"), "0");
        child_list(&d).await;
        child_list(&d).await;
        println!("{d:?}");
        println!("{PASSED}");
        return;
    }
    let imds = Imds::start(true).await;
    let ec2 = FixtureServer::start(empty_listing).await;
    let home = ScratchDir::new("ec2-credentials-imds");
    run_child(
        NAME,
        &home,
        &ec2.url(),
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url())],
    )
    .await;
    assert_eq!(assert_signed(&ec2, IMDS_KEY_ID, Some(IMDS_SESSION)), 2);
    assert!(
        ec2.calls()
            .iter()
            .all(|c| c.action() == "DescribeInstances")
    );
    // IMDSv2: a session token first, then the role and its credentials with that token, once:
    // the second listing used the cached credentials.
    let calls = imds.calls();
    let seen: Vec<(Method, &str)> = calls
        .iter()
        .map(|c| (c.method.clone(), c.path.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (Method::PUT, "/latest/api/token"),
            (Method::GET, "/latest/meta-data/iam/security-credentials/"),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/dispatch-role"
            ),
        ]
    );
    assert!(calls[0].ttl.is_some(), "the token request names a TTL");
    for c in &calls[1..] {
        assert_eq!(c.token.as_deref(), Some(IMDS_TOKEN), "{}", c.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_profile_from_a_shared_credentials_file() {
    const NAME: &str = "named_profile_from_a_shared_credentials_file";
    if child_case().as_deref() == Some(NAME) {
        child_lists_with_the_chain().await;
        return;
    }
    let ec2 = FixtureServer::start(empty_listing).await;
    let home = ScratchDir::new("ec2-credentials-profile");
    let files = ScratchDir::new("ec2-credentials-profile-files");
    let credentials = files.path().join("credentials");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = {DEFAULT_PROFILE_KEY_ID}\naws_secret_access_key = {DEFAULT_PROFILE_SECRET}\n\n\
             [dispatch]\naws_access_key_id = {NAMED_PROFILE_KEY_ID}\naws_secret_access_key = {NAMED_PROFILE_SECRET}\naws_session_token = {NAMED_PROFILE_SESSION}\n"
        ),
    )
    .expect("write the credentials file");
    let config = files.path().join("config");
    std::fs::write(&config, "[profile dispatch]\nregion = us-west-2\n")
        .expect("write the config file");
    // The IMDS address is a closed loopback port: the profile must be enough.
    run_child(
        NAME,
        &home,
        &ec2.url(),
        &[
            ("AWS_PROFILE", "dispatch".to_string()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                credentials.display().to_string(),
            ),
            ("AWS_CONFIG_FILE", config.display().to_string()),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://127.0.0.1:{}", free_port()),
            ),
        ],
    )
    .await;
    assert_eq!(
        assert_signed(&ec2, NAMED_PROFILE_KEY_ID, Some(NAMED_PROFILE_SESSION)),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_profile_under_home() {
    const NAME: &str = "default_profile_under_home";
    if child_case().as_deref() == Some(NAME) {
        child_lists_with_the_chain().await;
        return;
    }
    let ec2 = FixtureServer::start(empty_listing).await;
    let home = ScratchDir::new("ec2-credentials-home");
    write_default_profile(&home);
    run_child(
        NAME,
        &home,
        &ec2.url(),
        &[(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://127.0.0.1:{}", free_port()),
        )],
    )
    .await;
    assert_eq!(assert_signed(&ec2, DEFAULT_PROFILE_KEY_ID, None), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_credentials_come_first_in_the_chain() {
    const NAME: &str = "environment_credentials_come_first_in_the_chain";
    if child_case().as_deref() == Some(NAME) {
        child_lists_with_the_chain().await;
        return;
    }
    let imds = Imds::start(true).await;
    let ec2 = FixtureServer::start(empty_listing).await;
    let home = ScratchDir::new("ec2-credentials-env");
    write_default_profile(&home);
    run_child(
        NAME,
        &home,
        &ec2.url(),
        &[
            ("AWS_ACCESS_KEY_ID", ENV_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", ENV_SECRET.to_string()),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url()),
        ],
    )
    .await;
    assert_eq!(assert_signed(&ec2, ENV_KEY_ID, None), 1);
    assert!(
        imds.calls().is_empty(),
        "IMDS was not asked: {:?}",
        imds.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_keys_win_over_the_chain() {
    const NAME: &str = "static_keys_win_over_the_chain";
    if child_case().as_deref() == Some(NAME) {
        child_logging();
        let d = child_driver(serde_json::json!({
            "AccessKeyID": STATIC_KEY_ID,
            "SecretAccessKey": STATIC_SECRET,
        }));
        child_list(&d).await;
        println!("{d:?}");
        println!("{PASSED}");
        return;
    }
    let imds = Imds::start(true).await;
    let ec2 = FixtureServer::start(empty_listing).await;
    let home = ScratchDir::new("ec2-credentials-static");
    run_child(
        NAME,
        &home,
        &ec2.url(),
        &[
            ("AWS_ACCESS_KEY_ID", ENV_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", ENV_SECRET.to_string()),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url()),
        ],
    )
    .await;
    assert_eq!(assert_signed(&ec2, STATIC_KEY_ID, None), 1);
    assert!(
        imds.calls().is_empty(),
        "IMDS was not asked: {:?}",
        imds.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_anywhere_is_an_error_the_core_can_use() {
    const NAME: &str = "no_credentials_anywhere_is_an_error_the_core_can_use";
    if child_case().as_deref() == Some(NAME) {
        child_logging();
        let d = child_driver(serde_json::json!({}));
        for op in ["DescribeInstances", "RunInstances"] {
            let err = if op == "DescribeInstances" {
                tokio::time::timeout(DEADLINE, d.list(&BTreeMap::new()))
                    .await
                    .expect("list finished before the deadline")
                    .expect_err("no credentials")
            } else {
                let req = arvados_dispatch_cloud::cloud::CreateRequest {
                    instance_type: Arc::new(arvados_dispatch_cloud::core::types::InstanceType {
                        name: "m5large".into(),
                        provider_type: "m5.large".into(),
                        ..Default::default()
                    }),
                    image_id: "ami-0123".into(),
                    tags: BTreeMap::new(),
                    init_command: String::new(),
                    public_key: None,
                };
                tokio::time::timeout(DEADLINE, d.create(req))
                    .await
                    .expect("create finished before the deadline")
                    .expect_err("no credentials")
            };
            println!("{op} error: {:?}: {err}", err.kind);
            // The instance has no role: every source said it has nothing, so retrying will
            // not help until the configuration changes.
            assert_eq!(err.kind, CloudErrorKind::Permanent, "{err}");
            assert!(
                err.message
                    .starts_with(&format!("{op}: could not load AWS credentials")),
                "{err}"
            );
            assert!(err.message.contains("default chain"), "{err}");
        }
        // The failed attempt counts as a failed start in its subnet.
        let text = arvados_dispatch_cloud::http::metrics::encode_text(&d.metric_families());
        assert!(
            text.contains("arvados_dispatchcloud_ec2_instance_starts_total{subnet_id=\"subnet-a\",success=\"0\"} 1\n"),
            "{text}"
        );
        println!("{PASSED}");
        return;
    }
    let imds = Imds::start(false).await;
    let ec2 = FixtureServer::start(empty_listing).await;
    let home = ScratchDir::new("ec2-credentials-none");
    run_child(
        NAME,
        &home,
        &ec2.url(),
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url())],
    )
    .await;
    assert!(
        ec2.calls().is_empty(),
        "nothing unsigned was sent: {:?}",
        ec2.calls()
    );
    assert!(
        imds.calls()
            .iter()
            .any(|c| c.path == "/latest/meta-data/iam/security-credentials/"),
        "IMDS was asked for a role: {:?}",
        imds.calls()
    );
}
