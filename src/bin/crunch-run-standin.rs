//! `crunch-run-standin`: the dispatcher-facing command line of crunch-run
//! (reference-workers.md §2.8), for real, on one machine, without Docker.
//!
//! * `--list [--stdin-prices]` prints one line per running container UUID, `<uuid> stale` for
//!   a lock whose holder is gone but whose file is still locked, and `broken` when
//!   `crunch-run-broken` exists; lock files nobody holds are deleted.
//! * `--detach [flags…] <uuid>` takes the non-blocking exclusive lock
//!   `crunch-run-<uuid>.lock` (exit 1 if it is held), starts itself again as
//!   `-no-detach [flags…] <uuid>` in a new session with the lock on descriptor 3, copies stdin
//!   (the ConfigData JSON of `--stdin-config`) to it, writes `{"UUID":…,"PID":…}` to stdout and
//!   to the lock file, and exits 0.
//! * The detached runner reads ConfigData (`Env.ARVADOS_API_HOST`, `Env.ARVADOS_API_TOKEN`,
//!   `Env.ARVADOS_API_HOST_INSECURE`), reads the container record, sets state Running, sleeps
//!   for `standin.run_seconds` of the record (default 1 s; the field is served by
//!   `dispatch-sim controller`), then sets Complete with `standin.exit_code` (default 0) and
//!   removes its lock file. On SIGTERM or SIGINT it sets Cancelled (if it got to Running) and
//!   exits. It ignores SIGUSR2, which `--list` sends to check that it is alive.
//! * `--kill <signum> <uuid>` sends the signal to the runner, then checks every 10 ms for up to
//!   1 s that it is gone (exit 0) or still alive (exit 1); no lock file means exit 0.
//! * `--version` prints the version. A missing UUID exits 2.
//!
//! Flags use Go's syntax (`-x` and `--x` are the same). Unknown flags, such as the
//! `--runtime-engine=…` and `CrunchRunArgumentsList` entries the dispatcher passes, are
//! accepted and ignored. The lock directory is `$CRUNCH_RUN_STANDIN_DIR`, default `/var/lock`.
//! `ARVADOS_API_HOST` may be `host:port` (HTTPS) or a full URL; `$CRUNCH_RUN_STANDIN_API_URL`
//! overrides it (for a plain-HTTP stand-in controller). The runner logs to
//! `<dir>/crunch-run-<uuid>.log`. Tokens never reach a log line.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use arvados_dispatch_cloud::arvados::{Client, Fields};
use serde_json::{Value, json};

/// The descriptor the runner inherits its lock file on.
const LOCK_FD: i32 = 3;
const PREFIX: &str = "crunch-run-";
const SUFFIX: &str = ".lock";

fn lock_dir() -> PathBuf {
    std::env::var_os("CRUNCH_RUN_STANDIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lock"))
}

fn lock_path(dir: &Path, uuid: &str) -> PathBuf {
    dir.join(format!("{PREFIX}{uuid}{SUFFIX}"))
}

/// The parsed command line.
#[derive(Debug, Default)]
struct Args {
    list: bool,
    detach: bool,
    no_detach: bool,
    version: bool,
    stdin_config: bool,
    stdin_prices: bool,
    kill: Option<i32>,
    /// Everything but `-detach`, for the runner's command line.
    passthrough: Vec<String>,
    uuid: Option<String>,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut i = 0;
    while i < argv.len() {
        let arg = &argv[i];
        if !arg.starts_with('-') || arg == "-" {
            a.uuid = Some(arg.clone());
            a.passthrough.extend(argv[i..].iter().cloned());
            break;
        }
        if arg == "--" {
            a.uuid = argv.get(i + 1).cloned();
            a.passthrough.extend(argv[i..].iter().cloned());
            break;
        }
        let body = arg.trim_start_matches('-');
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let mut keep = true;
        match name {
            "list" => a.list = true,
            "detach" => {
                a.detach = true;
                keep = false;
            }
            "no-detach" => a.no_detach = true,
            "version" => a.version = true,
            "stdin-config" => a.stdin_config = true,
            "stdin-prices" => a.stdin_prices = true,
            "kill" => {
                let v = match value {
                    Some(v) => v,
                    None => {
                        i += 1;
                        argv.get(i)
                            .cloned()
                            .ok_or("flag needs an argument: -kill")?
                    }
                };
                a.kill = Some(
                    v.parse()
                        .map_err(|_| format!("invalid value {v:?} for flag -kill"))?,
                );
                keep = false;
            }
            _ => {}
        }
        if keep {
            a.passthrough.push(arg.clone());
        }
        i += 1;
    }
    Ok(a)
}

/// An exclusive or shared `flock` on an open file.
fn flock(f: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor this process owns; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), op) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Holds `crunch-run-all.lock` (blocking, exclusive) until dropped.
fn dir_lock(dir: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(format!("{PREFIX}all{SUFFIX}")))?;
    flock(&f, libc::LOCK_EX)?;
    Ok(f)
}

fn signal(pid: i32, sig: i32) -> std::io::Result<()> {
    if pid <= 0 {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: kill(2) with a positive PID takes no memory.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A process that exited but was not reaped yet counts as gone.
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[derive(serde::Deserialize)]
struct LockInfo {
    #[serde(rename = "UUID")]
    uuid: String,
    #[serde(rename = "PID")]
    pid: i32,
}

fn list(dir: &Path, stdin_prices: bool) -> ExitCode {
    if stdin_prices {
        let mut prices = Vec::new();
        if std::io::stdin().read_to_end(&mut prices).is_ok() && !prices.is_empty() {
            let dst = dir.join(format!("{PREFIX}prices.json"));
            let tmp = dir.join(format!("{PREFIX}prices.json~{}", std::process::id()));
            if let Err(e) = std::fs::write(&tmp, &prices).and_then(|_| std::fs::rename(&tmp, &dst))
            {
                eprintln!("error writing {}: {e}", dst.display());
            }
        }
    }
    let entries = match std::fs::read_dir(dir.join(".")) {
        Ok(rd) => rd,
        Err(e) => {
            eprintln!("error listing {}: {e}", dir.display());
            return ExitCode::from(1);
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut out = std::io::stdout().lock();
    if names.iter().any(|n| n == "crunch-run-broken") {
        let _ = writeln!(out, "broken");
    }
    let _guard = match dir_lock(dir) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error locking {}: {e}", dir.display());
            return ExitCode::from(1);
        }
    };
    for name in names {
        if !name.starts_with(PREFIX) || !name.ends_with(SUFFIX) || name == "crunch-run-all.lock" {
            continue;
        }
        let path = dir.join(&name);
        let Ok(mut f) = File::open(&path) else {
            continue;
        };
        if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
            continue;
        }
        if flock(&f, libc::LOCK_SH | libc::LOCK_NB).is_ok() {
            // Nobody holds it: the run is over.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let mut text = String::new();
        if f.read_to_string(&mut text).is_err() {
            continue;
        }
        let Ok(info) = serde_json::from_str::<LockInfo>(text.trim()) else {
            eprintln!("{}: cannot parse lock file contents", path.display());
            continue;
        };
        if signal(info.pid, libc::SIGUSR2).is_ok() {
            let _ = writeln!(out, "{}", info.uuid);
        } else {
            let _ = writeln!(out, "{} stale", info.uuid);
        }
    }
    ExitCode::SUCCESS
}

fn kill(dir: &Path, sig: i32, uuid: &str) -> ExitCode {
    let path = lock_path(dir, uuid);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{uuid}: reading {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let info = match serde_json::from_str::<LockInfo>(text.trim()) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{uuid}: lock file {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let pid = info.pid;
    if let Err(e) = signal(pid, sig) {
        eprintln!("{uuid}: pid {pid}: {e}");
        return ExitCode::SUCCESS;
    }
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(10));
        match signal(pid, 0) {
            Err(e) => {
                eprintln!("{uuid}: pid {pid}: {e}");
                return ExitCode::SUCCESS;
            }
            Ok(()) if is_zombie(pid) => {
                eprintln!("{uuid}: pid {pid}: exited");
                return ExitCode::SUCCESS;
            }
            Ok(()) => {}
        }
    }
    eprintln!("{uuid}: pid {pid}: sent signal {sig} but process is still alive");
    ExitCode::from(1)
}

fn detach(dir: &Path, args: &Args, uuid: &str) -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        eprintln!("{uuid}: reading stdin: {e}");
        return ExitCode::from(1);
    }
    let guard = match dir_lock(dir) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{uuid}: locking {}: {e}", dir.display());
            return ExitCode::from(1);
        }
    };
    let path = lock_path(dir, uuid);
    let mut lockfile = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{uuid}: opening {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    if let Err(e) = flock(&lockfile, libc::LOCK_EX | libc::LOCK_NB) {
        eprintln!("{uuid}: {}: {e} (already running?)", path.display());
        return ExitCode::from(1);
    }
    if let Err(e) = lockfile.set_len(0) {
        eprintln!("{uuid}: truncating {}: {e}", path.display());
        return ExitCode::from(1);
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(format!("{PREFIX}{uuid}.log")));
    let (out, err) = match log.and_then(|l| Ok((l.try_clone()?, l))) {
        Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
        Err(_) => (Stdio::null(), Stdio::null()),
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{uuid}: locating this program: {e}");
            return ExitCode::from(1);
        }
    };
    let fd = lockfile.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("-no-detach")
        .args(&args.passthrough)
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err);
    // SAFETY: only async-signal-safe calls between fork and exec: a new session, and the lock
    // file duplicated onto descriptor 3 (dup2 clears close-on-exec on the copy).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if fd == LOCK_FD {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, LOCK_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{uuid}: starting the runner: {e}");
            let _ = std::fs::remove_file(&path);
            return ExitCode::from(1);
        }
    };
    if let Some(mut w) = child.stdin.take()
        && let Err(e) = w.write_all(&stdin)
    {
        eprintln!("{uuid}: copying stdin to the runner: {e}");
    }
    let line = lock_line(uuid, child.id());
    if let Err(e) = lockfile.write_all(line.as_bytes()) {
        eprintln!("{uuid}: writing {}: {e}", path.display());
        return ExitCode::from(1);
    }
    drop(guard);
    print!("{line}");
    let _ = std::io::stdout().flush();
    ExitCode::SUCCESS
}

/// `{"UUID":…,"PID":…}` and a newline, in Go's field order.
fn lock_line(uuid: &str, pid: u32) -> String {
    format!(
        "{{\"UUID\":{},\"PID\":{pid}}}\n",
        Value::String(uuid.to_string())
    )
}

/// Takes `crunch-run-<uuid>.lock` for this process and records its PID.
fn take_lock(dir: &Path, uuid: &str) -> Result<File, String> {
    let _guard = dir_lock(dir).map_err(|e| format!("locking {}: {e}", dir.display()))?;
    let path = lock_path(dir, uuid);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    flock(&f, libc::LOCK_EX | libc::LOCK_NB)
        .map_err(|e| format!("{}: {e} (already running?)", path.display()))?;
    f.set_len(0)
        .and_then(|_| f.write_all(lock_line(uuid, std::process::id()).as_bytes()))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(f)
}

/// Where and how the runner reaches the controller.
struct ApiTarget {
    url: String,
    token: String,
    insecure: bool,
}

fn api_target(stdin_config: bool) -> Result<ApiTarget, String> {
    let env: serde_json::Map<String, Value> = if stdin_config {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("reading ConfigData from stdin: {e}"))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("ConfigData on stdin is not JSON: {e}"))?;
        match v.get("Env") {
            Some(Value::Object(m)) => m.clone(),
            _ => return Err("ConfigData has no Env object".into()),
        }
    } else {
        [
            "ARVADOS_API_HOST",
            "ARVADOS_API_TOKEN",
            "ARVADOS_API_HOST_INSECURE",
        ]
        .iter()
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .map(|v| (k.to_string(), Value::String(v)))
        })
        .collect()
    };
    let get = |k: &str| env.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let host = get("ARVADOS_API_HOST");
    let url = match std::env::var("CRUNCH_RUN_STANDIN_API_URL") {
        Ok(u) if !u.is_empty() => u,
        _ if host.contains("://") => host,
        _ if !host.is_empty() => format!("https://{host}"),
        _ => return Err("ARVADOS_API_HOST is not set".into()),
    };
    let token = get("ARVADOS_API_TOKEN");
    if token.is_empty() {
        return Err("ARVADOS_API_TOKEN is not set".into());
    }
    let insecure = matches!(
        get("ARVADOS_API_HOST_INSECURE").as_str(),
        "1" | "true" | "yes"
    );
    Ok(ApiTarget {
        url,
        token,
        insecure,
    })
}

fn fields(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => Fields::new(),
    }
}

/// Retries transient failures (no HTTP status, or 5xx) a few times.
async fn update(client: &Client, uuid: &str, f: Value) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
        match client.update_container(uuid, fields(f.clone())).await {
            Ok(_) => return Ok(()),
            Err(e) if e.status().is_none_or(|s| s >= 500) => last = e.to_string(),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(last)
}

fn remove_lock(dir: &Path, uuid: &str) {
    match dir_lock(dir) {
        Ok(_guard) => {
            let _ = std::fs::remove_file(lock_path(dir, uuid));
        }
        Err(e) => eprintln!("{uuid}: locking {}: {e}", dir.display()),
    }
}

async fn run_container(dir: &Path, uuid: &str, target: ApiTarget) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("{uuid}: cannot install signal handlers");
        return ExitCode::from(1);
    };
    let client = match Client::new(&target.url, &target.token, target.insecure) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{uuid}: {e}");
            return ExitCode::from(1);
        }
    };
    let record = match client.get_container(uuid, None).await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{uuid}: reading the container: {e}");
            remove_lock(dir, uuid);
            return ExitCode::from(1);
        }
    };
    let run = record
        .pointer("/standin/run_seconds")
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(1.0);
    let exit_code = record
        .pointer("/standin/exit_code")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    eprintln!("{uuid}: state {} -> Running", record["state"]);
    if let Err(e) = update(&client, uuid, json!({"state": "Running"})).await {
        eprintln!("{uuid}: setting state Running: {e}");
        remove_lock(dir, uuid);
        return ExitCode::from(1);
    }
    let cancelled = tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(run.min(1e9))) => false,
        _ = term.recv() => true,
        _ = int.recv() => true,
    };
    let (final_fields, what) = if cancelled {
        (json!({"state": "Cancelled"}), "Cancelled")
    } else {
        (
            json!({"state": "Complete", "exit_code": exit_code}),
            "Complete",
        )
    };
    let rc = match update(&client, uuid, final_fields).await {
        Ok(()) => {
            eprintln!("{uuid}: state -> {what}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{uuid}: setting state {what}: {e}");
            ExitCode::from(1)
        }
    };
    remove_lock(dir, uuid);
    rc
}

fn runner(dir: &Path, args: &Args, uuid: &str) -> ExitCode {
    // SAFETY: setting a signal disposition to SIG_IGN; `--list` probes liveness with SIGUSR2.
    unsafe {
        libc::signal(libc::SIGUSR2, libc::SIG_IGN);
    }
    // In the foreground (neither detaching nor detached) the runner takes the lock itself; a
    // detached runner holds it on descriptor 3.
    let _own_lock = if args.no_detach {
        None
    } else {
        match take_lock(dir, uuid) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("{uuid}: {e}");
                return ExitCode::from(1);
            }
        }
    };
    let target = match api_target(args.stdin_config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{uuid}: {e}");
            remove_lock(dir, uuid);
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{uuid}: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run_container(dir, uuid, target))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.version {
        println!("crunch-run-standin {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let dir = lock_dir();
    if args.list {
        return list(&dir, args.stdin_prices);
    }
    let Some(uuid) = args.uuid.clone().filter(|u| !u.is_empty()) else {
        eprintln!("missing required argument: container UUID");
        return ExitCode::from(2);
    };
    if uuid.contains('/') {
        eprintln!("invalid container UUID {uuid:?}");
        return ExitCode::from(2);
    }
    if let Some(sig) = args.kill {
        return kill(&dir, sig, &uuid);
    }
    if args.detach && !args.no_detach {
        return detach(&dir, &args, &uuid);
    }
    runner(&dir, &args, &uuid)
}
