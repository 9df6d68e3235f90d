//! The `instance` and `container` subcommands of the built binary against management APIs served
//! on loopback: list output format, action exit statuses and the `<id>: <status> (<host>)` lines
//! (reference-scheduler.md §6, "Who uses it").
#![cfg(feature = "runtime")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arvados_dispatch_cloud::config;
use arvados_dispatch_cloud::core::types::ContainerState;
use arvados_dispatch_cloud::core::{Dispatcher, Timestamp};
use arvados_dispatch_cloud::http::{ApiState, router};

use common::world::{World, options};

const GIB: i64 = 1 << 30;
const BIN: &str = env!("CARGO_BIN_EXE_arvados-dispatch-cloud");

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/config/current-layout.yml")
}

/// Two running containers on two m5large instances, two more waiting (MaxInstances 2).
fn busy_dispatcher() -> (Dispatcher, Timestamp) {
    let loaded = config::load_file(&fixture_path()).expect("fixture loads");
    let mut cfg = loaded.core.clone();
    cfg.cloud_vms.max_instances = 2;
    let mut w = World::new(cfg.clone(), 7);
    w.run_time = Duration::from_secs(24 * 3600);
    for i in 1..=4 {
        w.add(common::container(i, ContainerState::Queued, 1, 2, GIB));
    }
    let ok = w.run(Duration::from_secs(3600), |w| {
        w.db.values()
            .filter(|c| c.state == ContainerState::Running)
            .count()
            == 2
    });
    assert!(ok, "two containers should start");
    w.advance(Duration::from_secs(30));
    let now = w.now;
    let d = std::mem::replace(&mut w.d, Dispatcher::new(cfg, options(1), now));
    (d, now)
}

fn empty_dispatcher() -> (Dispatcher, Timestamp) {
    let loaded = config::load_file(&fixture_path()).expect("fixture loads");
    let now = Timestamp(1_000_000);
    (Dispatcher::new(loaded.core, options(1), now), now)
}

/// A management API served on loopback by a runtime that lives as long as the value.
struct Served {
    base: String,
    state: ApiState,
    _rt: tokio::runtime::Runtime,
}

fn serve((d, now): (Dispatcher, Timestamp), token: &str) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let state = ApiState::new(
        Arc::new(Mutex::new(d)),
        Arc::new(tokio::sync::Notify::new()),
        token.to_string(),
        Arc::new(move || now),
    );
    let app = router(state.clone());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    Served {
        base: format!("http://{addr}"),
        state,
        _rt: rt,
    }
}

/// Runs the binary with a deadline; the proxy variables are cleared so that requests stay on
/// loopback.
fn cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "ARVADOS_MANAGEMENT_TOKEN",
        "ARVADOS_CONFIG",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdout(std::process::Stdio::piped());
    cmd.stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("the binary starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const TOKEN: &str = "mAnAgEmEnTtOkEnmAnAgEmEnTtOkEn0123456789";

fn host(base: &str) -> &str {
    base.strip_prefix("http://").unwrap()
}

#[test]
fn instance_list_format() {
    let s = serve(busy_dispatcher(), TOKEN);
    let out = cli(
        &[
            "instance", "list", "-header", "--url", &s.base, "--token", TOKEN,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "instance\taddress\tstate\tidle-behavior\tconfig-type\tprovider-type\tprice\trunning-containers"
    );
    assert_eq!(lines.len(), 3, "{text}");
    let views = s.state.dispatcher.lock().unwrap().instances();
    for (line, v) in lines[1..].iter().zip(&views) {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 8, "{line}");
        assert_eq!(f[0], v.instance);
        let addr = if v.address.is_empty() {
            "-"
        } else {
            &v.address
        };
        assert_eq!(f[1], addr);
        assert_eq!(
            &f[2..7],
            ["running", "run", "m5large", "m5.large", "0.096000"]
        );
        let uuids = v.running_container_uuids.clone().unwrap().join(",");
        assert_eq!(f[7], uuids);
        assert!(f[7].starts_with("zzzzz-dz642-"));
    }
    // Without -header (and with --header spelled the clap way) the title line comes and goes.
    let out = cli(
        &["instance", "list", "--url", &s.base, "--token", TOKEN],
        &[],
    );
    assert_eq!(stdout(&out).lines().count(), 2);
    let out = cli(
        &["instance", "list", "--header", "--url", &s.base],
        &[("ARVADOS_MANAGEMENT_TOKEN", TOKEN)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 3);
    // A wrong token fails the list with status 1.
    let out = cli(
        &["instance", "list", "-url", &s.base, "-token", "wrong"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
}

#[test]
fn empty_lists_print_nothing() {
    let s = serve(empty_dispatcher(), TOKEN);
    for what in ["instance", "container"] {
        let out = cli(&[what, "list", "--url", &s.base, "--token", TOKEN], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "");
    }
}

#[test]
fn instance_actions_exit_statuses_and_lines() {
    let a = serve(busy_dispatcher(), TOKEN);
    let b = serve(empty_dispatcher(), TOKEN);
    let id = a.state.dispatcher.lock().unwrap().instances()[0]
        .instance
        .clone();

    // No IDs: usage error, status 2.
    let out = cli(
        &["instance", "hold", "--url", &a.base, "--token", TOKEN],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out), "usage error: no instance IDs provided\n");

    // A known ID gets 200 from the first dispatcher and is not sent to the second.
    let out = cli(
        &[
            "instance", "hold", &id, "--url", &a.base, "--url", &b.base, "--token", TOKEN,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), format!("{id}: 200 OK ({})\n", host(&a.base)));
    let behavior = |s: &Served| {
        s.state.dispatcher.lock().unwrap().instances()[0]
            .idle_behavior
            .as_str()
    };
    assert_eq!(behavior(&a), "hold");

    // An unknown ID gets 404 everywhere: one line per dispatcher, status 1. A known one in the
    // same call still succeeds.
    let out = cli(
        &[
            "instance",
            "drain",
            "i-nonesuch",
            &id,
            "--url",
            &b.base,
            "--url",
            &a.base,
            "--token",
            TOKEN,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let (ha, hb) = (host(&a.base), host(&b.base));
    assert_eq!(
        stderr(&out),
        format!(
            "i-nonesuch: 404 Not Found ({hb})\n{id}: 404 Not Found ({hb})\n\
             i-nonesuch: 404 Not Found ({ha})\n{id}: 200 OK ({ha})\n"
        )
    );
    assert_eq!(behavior(&a), "drain");

    let out = cli(
        &["instance", "run", &id, "--url", &a.base, "--token", TOKEN],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(behavior(&a), "run");

    // Kill with a Go-style -reason flag.
    let out = cli(
        &[
            "instance", "kill", "-reason", "testing", &id, "--url", &a.base, "--token", TOKEN,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), format!("{id}: 200 OK ({ha})\n"));
    let st = a.state.dispatcher.lock().unwrap().instances();
    let killed = st.iter().find(|v| v.instance == id).expect("still listed");
    assert_eq!(killed.worker_state.as_str(), "shutdown");

    // A wrong token: 403 on every attempt, status 1.
    let out = cli(
        &["instance", "hold", &id, "--url", &a.base, "--token", "nope"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), format!("{id}: 403 Forbidden ({ha})\n"));
}

#[test]
fn container_list_and_kill() {
    let s = serve(busy_dispatcher(), TOKEN);
    let out = cli(
        &[
            "container",
            "list",
            "-header",
            "--url",
            &s.base,
            "--token",
            TOKEN,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "container\tstate\tpriority\tprovider-type\tfirst-seen\tscheduling-status"
    );
    assert_eq!(lines.len(), 5, "{text}");
    let mut running = Vec::new();
    for l in &lines[1..] {
        let f: Vec<&str> = l.split('\t').collect();
        assert_eq!(f.len(), 6, "{l}");
        assert!(f[0].starts_with("zzzzz-dz642-"));
        assert_eq!(f[2], "1");
        assert_eq!(f[3], "m5.large");
        assert!(f[4].ends_with('Z'), "{l}");
        if f[1] == "Running" {
            assert_eq!(f[5], "-", "a running container has no status: {l}");
            running.push(f[0].to_string());
        } else {
            assert!(f[5].starts_with("Waiting"), "{l}");
        }
    }
    assert_eq!(running.len(), 2);

    let out = cli(
        &["container", "kill", "--url", &s.base, "--token", TOKEN],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let h = host(&s.base);
    let out = cli(
        &[
            "container",
            "kill",
            "-reason=testing",
            &running[0],
            "--url",
            &s.base,
            "--token",
            TOKEN,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), format!("{}: 200 OK ({h})\n", running[0]));
    let out = cli(
        &[
            "container",
            "kill",
            "zzzzz-dz642-999999999999999",
            "--url",
            &s.base,
            "--token",
            TOKEN,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!("zzzzz-dz642-999999999999999: 404 Not Found ({h})\n")
    );
}

#[test]
fn urls_and_token_come_from_the_config() {
    let a = serve(busy_dispatcher(), TOKEN);
    let b = serve(empty_dispatcher(), TOKEN);
    // The current-layout fixture with its DispatchCloud InternalURLs pointed at our two servers.
    let text = std::fs::read_to_string(fixture_path()).unwrap();
    let from = "          \"http://dispatch.internal:9006/\": {}\n";
    assert!(text.contains(from));
    let text = text.replace(
        from,
        &format!(
            "          \"{}/\": {{}}\n          \"{}\": {{}}\n",
            b.base, a.base
        ),
    );
    let dir = std::env::temp_dir().join(format!("cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.yml");
    std::fs::write(&cfg, text).unwrap();
    let cfg = cfg.to_str().unwrap();

    let out = cli(&["--config", cfg, "instance", "list"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2, "both dispatchers asked");
    // Go-style -config, and $ARVADOS_CONFIG.
    let out = cli(&["instance", "list", "-config", cfg], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = a.state.dispatcher.lock().unwrap().instances()[1]
        .instance
        .clone();
    let out = cli(&["instance", "hold", &id], &[("ARVADOS_CONFIG", cfg)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "{id}: 404 Not Found ({})\n{id}: 200 OK ({})\n",
            host(&b.base),
            host(&a.base)
        )
    );
    // --token overrides the config's token.
    let out = cli(
        &["--config", cfg, "instance", "run", &id, "--token", "wrong"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("403 Forbidden"));
    // A config that cannot be read is status 1 with the loader's message.
    let out = cli(
        &["--config", "/nonexistent/config.yml", "instance", "list"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/config.yml"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_still_works() {
    let out = cli(
        &["check-config", "--config", fixture_path().to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Cluster:"));
    assert!(!stdout(&out).contains(TOKEN));
}
