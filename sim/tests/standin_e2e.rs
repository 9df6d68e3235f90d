//! `dispatch-sim controller` end to end on 127.0.0.1: the binary prints its address, enforces
//! the token and the server-side rules (lock needs priority > 0, MaxDispatchAttempts on
//! unlock), and the stand-in crunch-run (`crunch-run-standin`, a binary of the root package)
//! runs containers against it: Running then Complete, or Cancelled after `--kill 15`, as
//! `/_standin/status` shows. SIGTERM stops the controller.
//!
//! The crunch-run stand-in is taken from `$CRUNCH_RUN_STANDIN_BIN`, else from the target
//! directory this test runs from (built by `cargo test --workspace`), else built with
//! `cargo build -p arvados-dispatch-cloud --bin crunch-run-standin`.

#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TOKEN: &str = "e2e-standin-token";

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dispatch-sim-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn standin_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CRUNCH_RUN_STANDIN_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/standin_e2e-… -> target/<profile>/crunch-run-standin
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps")
        .to_path_buf();
    let bin = profile_dir.join("crunch-run-standin");
    if !bin.exists() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let target = profile_dir.parent().expect("target dir");
        let status = Command::new(env!("CARGO"))
            .current_dir(root)
            .args([
                "build",
                "-p",
                "arvados-dispatch-cloud",
                "--bin",
                "crunch-run-standin",
            ])
            .env("CARGO_TARGET_DIR", target)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building crunch-run-standin failed");
    }
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// One HTTP/1.1 request; returns the status and the parsed JSON body.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connect to the stand-in");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status: u16 = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {resp:?}"));
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{method} {path}: {e}: {body:?}")),
    )
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

struct Controller {
    child: Child,
    addr: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_controller(dir: &Path, workload: &str) -> Controller {
    let w = dir.join("workload.yaml");
    std::fs::write(&w, workload).expect("write workload");
    let log = std::fs::File::create(dir.join("controller.log")).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dispatch-sim"))
        .args(["controller", "--listen", "127.0.0.1:0", "--workload"])
        .arg(&w)
        .env("ARVADOS_API_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start dispatch-sim controller");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the address line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    Controller { child, addr }
}

fn status(addr: &str) -> Value {
    let (code, v) = http(addr, "GET", "/_standin/status", None, "");
    assert_eq!(code, 200);
    v
}

fn state(addr: &str, uuid: &str) -> String {
    status(addr)["containers"][uuid]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn standin(bin: &Path, dir: &Path, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(bin)
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
        .expect("stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const WORKLOAD: &str = "
max_dispatch_attempts: 2
containers:
  - {uuid: zzzzz-dz642-shortrun0000001, run_seconds: 0.3, exit_code: 4, vcpus: 2, ram: 1073741824}
  - {uuid: zzzzz-dz642-longrun00000002, run_seconds: 600}
  - {uuid: zzzzz-dz642-zeropriority003, priority: 0}
  - {uuid: zzzzz-dz642-requeued0000004, priority: 7}
";

#[test]
fn controller_rules_and_standin_runs_end_to_end() {
    let dir = tempdir("standin-e2e");
    let bin = standin_bin();
    let ctl = start_controller(&dir, WORKLOAD);
    let a = ctl.addr.as_str();

    // Token checks; the status page needs none.
    let (code, v) = http(a, "GET", "/arvados/v1/containers", None, "");
    assert_eq!(code, 401);
    assert_eq!(v["errors"][0], "Not logged in");
    let (code, _) = http(a, "GET", "/arvados/v1/containers", Some("wrong"), "");
    assert_eq!(code, 401);
    let s = status(a);
    assert_eq!(s["counts"]["Queued"], 4);
    assert_eq!(s["total"], 4);

    // The dispatcher's "avail" query.
    let (code, v) = http(
        a,
        "GET",
        "/arvados/v1/containers?count=none&filters=%5B%5B%22state%22%2C%22%3D%22%2C%22Queued%22%5D%2C%5B%22priority%22%2C%22%3E%22%2C%220%22%5D%5D&limit=1000&order=priority+desc&select=%5B%22uuid%22%2C%22priority%22%5D",
        Some(TOKEN),
        "",
    );
    assert_eq!(code, 200, "{v}");
    let uuids: Vec<&str> = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["uuid"].as_str().expect("uuid"))
        .collect();
    assert_eq!(
        uuids,
        vec![
            "zzzzz-dz642-requeued0000004",
            "zzzzz-dz642-longrun00000002",
            "zzzzz-dz642-shortrun0000001"
        ]
    );
    assert_eq!(v["kind"], "arvados#containerList");
    assert!(v.get("items_available").is_none(), "count=none");

    // Server-side rules: lock needs priority > 0; MaxDispatchAttempts=2 cancels on unlock.
    let (code, v) = http(
        a,
        "POST",
        "/arvados/v1/containers/zzzzz-dz642-zeropriority003/lock",
        Some(TOKEN),
        "",
    );
    assert_eq!(code, 422);
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap_or("")
            .contains("cannot lock when priority<=0"),
        "{v}"
    );
    let r = "/arvados/v1/containers/zzzzz-dz642-requeued0000004";
    for round in 1..=2 {
        let (code, v) = http(a, "POST", &format!("{r}/lock"), Some(TOKEN), "");
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["state"], "Locked");
        assert_eq!(v["lock_count"], round);
        let (code, v) = http(a, "POST", &format!("{r}/unlock"), Some(TOKEN), "");
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["state"], if round == 1 { "Queued" } else { "Cancelled" });
    }
    let s = status(a);
    assert_eq!(
        s["containers"]["zzzzz-dz642-requeued0000004"]["runtime_status"]["error"],
        "Failed to start container.  Cancelled after exceeding 'Containers.MaxDispatchAttempts' (lock_count=2)"
    );

    // Lock two containers and run them with the crunch-run stand-in.
    for u in ["zzzzz-dz642-shortrun0000001", "zzzzz-dz642-longrun00000002"] {
        let (code, v) = http(
            a,
            "POST",
            &format!("/arvados/v1/containers/{u}/lock"),
            Some(TOKEN),
            "",
        );
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["locked_by_uuid"], "zzzzz-gj3su-dispatchersimul0");
    }
    let cfg =
        json!({"Env": {"ARVADOS_API_HOST": format!("http://{a}"), "ARVADOS_API_TOKEN": TOKEN},
                     "KeepBuffers": 0, "Cluster": null, "EC2SpotCheck": false})
        .to_string();
    for u in ["zzzzz-dz642-shortrun0000001", "zzzzz-dz642-longrun00000002"] {
        let (rc, out, err) = standin(
            &bin,
            &dir,
            &["--detach", "--stdin-config", "--runtime-engine=stub", u],
            &cfg,
        );
        assert_eq!(rc, 0, "{err}");
        assert!(out.contains(u), "{out}");
    }
    wait_for("the short container to complete", || {
        state(a, "zzzzz-dz642-shortrun0000001") == "Complete"
    });
    wait_for("the long container to run", || {
        state(a, "zzzzz-dz642-longrun00000002") == "Running"
    });
    let (rc, out, _) = standin(&bin, &dir, &["--list"], "");
    assert_eq!((rc, out.as_str()), (0, "zzzzz-dz642-longrun00000002\n"));
    let (rc, _, err) = standin(
        &bin,
        &dir,
        &["--kill", "15", "zzzzz-dz642-longrun00000002"],
        "",
    );
    assert_eq!(rc, 0, "{err}");
    wait_for("the long container to be cancelled", || {
        state(a, "zzzzz-dz642-longrun00000002") == "Cancelled"
    });

    let s = status(a);
    let short = &s["containers"]["zzzzz-dz642-shortrun0000001"];
    assert_eq!(short["exit_code"], 4);
    assert_eq!(short["running_entries"], 1, "ran exactly once");
    assert_eq!(short["lock_count"], 1);
    assert_eq!(
        s["containers"]["zzzzz-dz642-longrun00000002"]["running_entries"],
        1
    );
    assert_eq!(s["counts"]["Complete"], 1);
    assert_eq!(s["counts"]["Cancelled"], 2);
    assert_eq!(s["counts"]["Queued"], 1);
    assert_eq!(s["all_finished"], false);

    // A finished container cannot go back to Running.
    let (code, v) = http(
        a,
        "PUT",
        "/arvados/v1/containers/zzzzz-dz642-shortrun0000001",
        Some(TOKEN),
        "container=%7B%22state%22%3A%22Running%22%7D",
    );
    assert_eq!(code, 422, "{v}");

    // SIGTERM stops it cleanly.
    let mut ctl = ctl;
    // SAFETY: kill(2) on the child this test started.
    unsafe {
        libc_kill(ctl.child.id() as i32, 15);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(st) = ctl.child.try_wait().expect("try_wait") {
            break st.code();
        }
        assert!(Instant::now() < deadline, "the controller ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(25));
    };
    assert_eq!(code, Some(0));
    let log = std::fs::read_to_string(dir.join("controller.log")).expect("log");
    assert!(
        log.contains("POST /arvados/v1/containers/zzzzz-dz642-shortrun0000001/lock -> 200"),
        "{log}"
    );
    assert!(!log.contains(TOKEN), "the token is never logged");
}

#[test]
fn controller_refuses_a_bad_workload_or_a_missing_token() {
    let dir = tempdir("standin-bad");
    let w = dir.join("bad.yaml");
    std::fs::write(&w, "- {colour: blue}\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_dispatch-sim"))
        .args([
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "t",
            "--workload",
        ])
        .arg(&w)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.yaml"));
    std::fs::write(&w, "- {}\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_dispatch-sim"))
        .args(["controller", "--listen", "127.0.0.1:0", "--workload"])
        .arg(&w)
        .env_remove("ARVADOS_API_TOKEN")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token"));
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
