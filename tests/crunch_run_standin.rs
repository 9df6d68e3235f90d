//! The stand-in crunch-run's command line (reference-workers.md §2.8) on a temporary lock
//! directory: `--list` output (running, `stale`, `broken`, cleanup of unheld locks), `--kill`,
//! usage errors, and a detached run against a small recording controller on 127.0.0.1 that
//! sees Running then Complete, or Running then Cancelled after `--kill 15`.
//! (The same flow against `dispatch-sim controller` lives in sim/tests/standin_e2e.rs.)

#![cfg(feature = "runtime")]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_crunch-run-standin");
const TOKEN: &str = "standin-test-token";

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("crunch-run-standin-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn standin(dir: &Path, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("CRUNCH_RUN_STANDIN_DIR", dir)
        .env_remove("CRUNCH_RUN_STANDIN_API_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run crunch-run-standin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hold_lock(path: &Path, content: &str) -> File {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open lock file");
    // SAFETY: flock on a descriptor this test owns.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, 0, "lock {}", path.display());
    f.write_all(content.as_bytes()).expect("write lock file");
    f
}

fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().expect("wait true");
    pid
}

#[test]
fn usage_errors_and_version() {
    let d = tempdir("usage");
    let (rc, _, err) = standin(&d, &["--detach", "--stdin-config"], "");
    assert_eq!(rc, 2, "{err}");
    let (rc, _, _) = standin(&d, &["--kill", "15"], "");
    assert_eq!(rc, 2);
    let (rc, _, _) = standin(&d, &["--kill", "x", "zzzzz-dz642-000000000000001"], "");
    assert_eq!(rc, 2);
    let (rc, out, _) = standin(&d, &["--version"], "");
    assert_eq!(rc, 0);
    assert!(out.starts_with("crunch-run-standin "), "{out}");
}

#[test]
fn list_reports_running_stale_and_broken_and_removes_unheld_locks() {
    let d = tempdir("list");
    let (rc, out, _) = standin(&d, &["--list"], "");
    assert_eq!((rc, out.as_str()), (0, ""));

    // Held by a live process: reported as running. The PID is a child that SIGUSR2 may end.
    let mut alive = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let _held = hold_lock(
        &d.join("crunch-run-zzzzz-dz642-000000000000001.lock"),
        &format!(
            "{{\"UUID\":\"zzzzz-dz642-000000000000001\",\"PID\":{}}}\n",
            alive.id()
        ),
    );
    // Held, but its PID is gone (a leftover child holds the lock): stale.
    let _stale = hold_lock(
        &d.join("crunch-run-zzzzz-dz642-000000000000002.lock"),
        &format!(
            "{{\"UUID\":\"zzzzz-dz642-000000000000002\",\"PID\":{}}}\n",
            dead_pid()
        ),
    );
    // Not held: removed, not printed.
    let unheld = d.join("crunch-run-zzzzz-dz642-000000000000003.lock");
    std::fs::write(
        &unheld,
        "{\"UUID\":\"zzzzz-dz642-000000000000003\",\"PID\":1}\n",
    )
    .expect("write");
    // Empty: skipped and kept. Other files: ignored.
    let empty = d.join("crunch-run-zzzzz-dz642-000000000000004.lock");
    std::fs::write(&empty, "").expect("write");
    std::fs::write(d.join("unrelated.lock"), "x").expect("write");
    std::fs::write(d.join("crunch-run-broken"), "").expect("write");

    let (rc, out, err) = standin(&d, &["-list"], "");
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        out,
        "broken\nzzzzz-dz642-000000000000001\nzzzzz-dz642-000000000000002 stale\n"
    );
    assert!(!unheld.exists(), "an unheld lock file is removed");
    assert!(empty.exists(), "an empty lock file is left alone");
    let _ = alive.kill();
    let _ = alive.wait();

    // The dispatcher's parser agrees.
    let r = arvados_dispatch_cloud::core::pool::remote::parse_list(&out, "zzzzz");
    assert_eq!(r.uuids, vec!["zzzzz-dz642-000000000000001".to_string()]);
    assert!(r.stale && r.broken);
}

#[test]
fn list_writes_stdin_prices_atomically() {
    let d = tempdir("prices");
    let prices = r#"[{"StartTime":"2026-12-01T00:00:00Z","Price":0.5}]"#;
    let (rc, _, err) = standin(&d, &["--list", "--stdin-prices"], prices);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(d.join("crunch-run-prices.json")).expect("prices file"),
        prices
    );
}

#[test]
fn kill_without_a_lock_file_succeeds() {
    let d = tempdir("kill");
    let (rc, _, _) = standin(&d, &["--kill", "15", "zzzzz-dz642-000000000000009"], "");
    assert_eq!(rc, 0);
    // A garbled lock file is an error (the dispatcher retries).
    std::fs::write(
        d.join("crunch-run-zzzzz-dz642-000000000000009.lock"),
        "junk",
    )
    .expect("write");
    let (rc, _, _) = standin(&d, &["--kill", "15", "zzzzz-dz642-000000000000009"], "");
    assert_eq!(rc, 1);
}

/// A controller that serves one container record and records the updates it receives.
#[derive(Default)]
struct Ctl {
    run_seconds: f64,
    exit_code: i64,
    updates: Mutex<Vec<(String, Value)>>,
    auth_ok: Mutex<bool>,
}

fn form_field(body: &str, key: &str) -> Option<String> {
    reqwest::Url::parse(&format!("http://x/?{body}"))
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

async fn ctl_handle(
    State(ctl): State<Arc<Ctl>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {TOKEN}") {
        *ctl.auth_ok.lock().expect("lock") = false;
        return (
            StatusCode::UNAUTHORIZED,
            json!({"errors": ["Not logged in"]}).to_string(),
        );
    }
    let uuid = uri.path().rsplit('/').next().unwrap_or("").to_string();
    match method.as_str() {
        "GET" => (
            StatusCode::OK,
            json!({"uuid": uuid, "state": "Locked",
                   "standin": {"run_seconds": ctl.run_seconds, "exit_code": ctl.exit_code}})
            .to_string(),
        ),
        "PUT" => {
            let text = String::from_utf8_lossy(&body).into_owned();
            let fields: Value = form_field(&text, "container")
                .and_then(|c| serde_json::from_str(&c).ok())
                .unwrap_or(Value::Null);
            ctl.updates
                .lock()
                .expect("lock")
                .push((uuid.clone(), fields));
            (StatusCode::OK, json!({"uuid": uuid}).to_string())
        }
        _ => (
            StatusCode::NOT_FOUND,
            json!({"errors": ["Path not found"]}).to_string(),
        ),
    }
}

/// Starts the controller on a thread with its own runtime; returns its URL.
fn start_ctl(ctl: Arc<Ctl>) -> String {
    *ctl.auth_ok.lock().expect("lock") = true;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr"))
                .expect("send addr");
            let app = axum::Router::new().fallback(ctl_handle).with_state(ctl);
            axum::serve(listener, app).await.expect("serve");
        });
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("controller started");
    format!("http://{addr}")
}

/// ConfigData in the shape the dispatcher sends (reference-workers.md §2.5), with the
/// `ARVADOS_API_HOST` the controller client reports for `url`.
fn config_data(url: &str) -> String {
    let client = arvados_dispatch_cloud::arvados::Client::new(url, TOKEN, false).expect("client");
    json!({
        "Env": {
            "ARVADOS_API_HOST": client.api_host(),
            "ARVADOS_API_TOKEN": TOKEN,
            "InstanceType": "{\n    \"ProviderType\": \"loopback\"\n}\n",
            "GatewayAddress": "127.0.0.1:0",
            "GatewayAuthSecret": "00",
        },
        "KeepBuffers": 0,
        "Cluster": null,
        "EC2SpotCheck": false,
    })
    .to_string()
}

/// Waits (generously) until `f` holds.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn states(ctl: &Ctl, uuid: &str) -> Vec<Value> {
    ctl.updates
        .lock()
        .expect("lock")
        .iter()
        .filter(|(u, _)| u == uuid)
        .map(|(_, f)| f.clone())
        .collect()
}

#[test]
fn detached_run_reports_running_then_complete_and_kill_cancels() {
    let d = tempdir("run");
    let ctl = Arc::new(Ctl {
        run_seconds: 0.5,
        exit_code: 3,
        ..Ctl::default()
    });
    let url = start_ctl(ctl.clone());
    let cfg = config_data(&url);
    let u1 = "zzzzz-dz642-000000000000001";
    let (rc, out, err) = standin(
        &d,
        &[
            "--detach",
            "--stdin-config",
            "--runtime-engine=stub",
            "--foo",
            u1,
        ],
        &cfg,
    );
    assert_eq!(rc, 0, "{err}");
    let info: Value = serde_json::from_str(out.trim()).expect("detach prints JSON");
    assert_eq!(info["UUID"], u1);
    assert!(info["PID"].as_u64().is_some_and(|p| p > 0), "{out}");
    assert!(out.starts_with("{\"UUID\":"), "Go's field order: {out}");
    wait_for("Running", || !states(&ctl, u1).is_empty());
    wait_for("Complete", || states(&ctl, u1).len() == 2);
    assert_eq!(
        states(&ctl, u1),
        vec![
            json!({"state": "Running"}),
            json!({"state": "Complete", "exit_code": 3})
        ]
    );
    wait_for("the lock file to go", || {
        !d.join(format!("crunch-run-{u1}.lock")).exists()
    });
    assert_eq!(standin(&d, &["--list"], "").1, "");

    // A long run: listed while it runs, refused a second time, ended early by --kill 15.
    let ctl2 = Arc::new(Ctl {
        run_seconds: 600.0,
        exit_code: 0,
        ..Ctl::default()
    });
    let url2 = start_ctl(ctl2.clone());
    let u2 = "zzzzz-dz642-000000000000002";
    let (rc, _, err) = standin(&d, &["--detach", "--stdin-config", u2], &config_data(&url2));
    assert_eq!(rc, 0, "{err}");
    wait_for("Running", || !states(&ctl2, u2).is_empty());
    let (rc, out, _) = standin(&d, &["--list"], "");
    assert_eq!((rc, out.as_str()), (0, format!("{u2}\n").as_str()));
    let (rc, _, err) = standin(&d, &["--detach", "--stdin-config", u2], &config_data(&url2));
    assert_eq!(rc, 1, "a second detach of a running UUID fails: {err}");
    let (rc, _, err) = standin(&d, &["--kill", "15", u2], "");
    assert_eq!(rc, 0, "{err}");
    wait_for("Cancelled", || states(&ctl2, u2).len() == 2);
    assert_eq!(
        states(&ctl2, u2),
        vec![json!({"state": "Running"}), json!({"state": "Cancelled"})]
    );
    wait_for("the list to empty", || {
        standin(&d, &["--list"], "").1.is_empty()
    });
    assert!(*ctl.auth_ok.lock().expect("lock") && *ctl2.auth_ok.lock().expect("lock"));
    let log = std::fs::read_to_string(d.join(format!("crunch-run-{u2}.log"))).unwrap_or_default();
    assert!(
        !log.contains(TOKEN),
        "the token stays out of the runner log"
    );
}
