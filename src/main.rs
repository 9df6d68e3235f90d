//! The `arvados-dispatch-cloud` command.
//!
//! Subcommands so far:
//! * `check-config` loads the cluster config, prints its warnings to stderr and a summary to
//!   stdout. Exit status: 0 on success, 2 when the config cannot be used (and for usage errors,
//!   as clap does).
//! * `instance list [-header]`, `instance hold|drain|run ID...`, `instance kill [-reason R] ID...`,
//!   `container list [-header]` and `container kill [-reason R] UUID...` talk to the management
//!   API of every `Services.DispatchCloud.InternalURLs` (or `--url`), with the ManagementToken
//!   (or `--token`, or `$ARVADOS_MANAGEMENT_TOKEN`). List output and exit statuses are those of
//!   Go's `arvados-server instance` (reference-scheduler.md §6): 0 when every ID got a 200, 1
//!   otherwise, 2 when no ID was given. Go-style single-dash long flags (`-header`, `-reason R`)
//!   are accepted as well as `--header`.
//!
//! * `cloudtest [-instance-type T] [-image-id I] [-instance-set-id ID] [-destroy-existing]
//!   [-command CMD] [-skip-boot-probe] [-pause-before-destroy]` creates, checks and destroys one
//!   instance with the configured driver (reference-workers.md §6.5; see `cloudtest`). Exit
//!   status: 0 when every check passed, 1 when one failed, 2 when the test cannot start (an
//!   unusable config, an unknown instance type, no usable DispatchPrivateKey).
//!
//! Secrets are never printed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use arvados_dispatch_cloud::config::{self, Loaded, units::format_bytes};

/// A simulation-first drop-in replacement for the Arvados cloud dispatcher.
#[derive(Debug, Parser)]
#[command(name = "arvados-dispatch-cloud", version)]
struct Cli {
    /// The Arvados cluster config file [default: $ARVADOS_CONFIG, else /etc/arvados/config.yml].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
enum Command {
    /// Load and validate the cluster config; print warnings to stderr and a summary to stdout.
    CheckConfig,
    /// Run the dispatcher: poll the controller, run containers on cloud VMs, serve the
    /// management API and metrics. SIGTERM or SIGINT stops it without destroying any VM.
    #[cfg(feature = "runtime")]
    Serve {
        /// Log line format on stderr.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// List the dispatcher's cloud instances or change their idle behaviour (management API).
    #[cfg(feature = "runtime")]
    Instance {
        #[command(flatten)]
        remote: admin::Remote,
        #[command(subcommand)]
        action: admin::InstanceAction,
    },
    /// List the dispatcher's container queue or kill a container (management API).
    #[cfg(feature = "runtime")]
    Container {
        #[command(flatten)]
        remote: admin::Remote,
        #[command(subcommand)]
        action: admin::ContainerAction,
    },
    /// Smoke-test the cloud driver and config: create one instance, check its tags, probe it
    /// over SSH, run an optional command, destroy it. Exit status 0 only if every check passed.
    #[cfg(feature = "runtime")]
    Cloudtest(CloudtestArgs),
}

/// `cloudtest` flags (Go's `arvados-server cloudtest` flags, plus `-skip-boot-probe`).
#[cfg(feature = "runtime")]
#[derive(Debug, clap::Args)]
struct CloudtestArgs {
    /// The InstanceSetID tag value of the test instance.
    #[arg(long, value_name = "ID", default_value = arvados_dispatch_cloud::cloudtest::DEFAULT_INSTANCE_SET_ID)]
    instance_set_id: String,
    /// The image to boot [default: the config's CloudVMs.ImageID].
    #[arg(long, value_name = "IMAGE")]
    image_id: Option<String>,
    /// The configured instance type to create [default: the cheapest].
    #[arg(long, value_name = "TYPE")]
    instance_type: Option<String>,
    /// Destroy existing instances tagged with the test's InstanceSetID instead of failing.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
        default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    destroy_existing: bool,
    /// A shell command to run on the instance once it has booted (non-zero exit fails the test).
    #[arg(long, value_name = "CMD")]
    command: Option<String>,
    /// Do not run BootProbeCommand over SSH (the tags are still checked).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
        default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    skip_boot_probe: bool,
    /// Wait for Enter on stdin before destroying the instance (the login command is logged).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
        default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pause_before_destroy: bool,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How `serve` writes its log lines.
#[cfg(feature = "runtime")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (fields include `container` and `instance`).
    Json,
}

/// Log lines on stderr in `format`, filtered by `$ARVADOS_DISPATCH_LOG` (default `info`);
/// `trace` applies to this program's own targets only (see `runtime::logging`).
#[cfg(feature = "runtime")]
fn init_logging(format: LogFormat) {
    let env = tracing_subscriber::EnvFilter::try_from_env("ARVADOS_DISPATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if let Err(e) = arvados_dispatch_cloud::runtime::logging::init(env, format == LogFormat::Json) {
        eprintln!("warning: logging is not set up: {e}");
    }
}

/// `serve`: load the config, set up logging, run the shell until SIGTERM/SIGINT.
#[cfg(feature = "runtime")]
fn serve(path: &std::path::Path, format: LogFormat) -> ExitCode {
    init_logging(format);
    let loaded = match config::load_file(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let cluster_json = cluster_json(path, &loaded.cluster_id);
    let rt = match async_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(arvados_dispatch_cloud::runtime::serve(loaded, cluster_json)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

/// `cloudtest`: load the config, set up logging, run the test sequence.
#[cfg(feature = "runtime")]
fn cloudtest(path: &std::path::Path, args: CloudtestArgs) -> ExitCode {
    use arvados_dispatch_cloud::cloudtest;
    init_logging(args.log_format);
    let loaded = match config::load_file(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let opts = cloudtest::Options {
        instance_set_id: args.instance_set_id,
        image_id: args.image_id.filter(|s| !s.is_empty()),
        instance_type: args.instance_type.filter(|s| !s.is_empty()),
        destroy_existing: args.destroy_existing,
        command: args.command.filter(|s| !s.is_empty()),
        skip_boot_probe: args.skip_boot_probe,
        pause_before_destroy: args.pause_before_destroy,
    };
    let rt = match async_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let report = rt.block_on(cloudtest::run(&loaded, &opts));
    // The loopback driver's SSH servers and the SDK clients go with the runtime.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match report {
        Ok(r) if r.passed() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

/// The multi-threaded tokio runtime `serve` and `cloudtest` run on.
#[cfg(feature = "runtime")]
fn async_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

/// The cluster's section of the config file as JSON (crunch-run's ConfigData `Cluster`).
#[cfg(feature = "runtime")]
fn cluster_json(path: &std::path::Path, cluster_id: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_yaml::from_str(&text).ok()?;
    v.get("Clusters")?.get(cluster_id).cloned()
}

/// Exit status for a config that cannot be used.
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse_from(go_style_flags(std::env::args_os()));
    let path = cli.config.clone().unwrap_or_else(default_config_path);
    match cli.command {
        Command::CheckConfig => check_config(&path),
        #[cfg(feature = "runtime")]
        Command::Serve { log_format } => serve(&path, log_format),
        #[cfg(feature = "runtime")]
        Command::Instance { remote, action } => admin::instance(&path, &remote, action),
        #[cfg(feature = "runtime")]
        Command::Container { remote, action } => admin::container(&path, &remote, action),
        #[cfg(feature = "runtime")]
        Command::Cloudtest(args) => cloudtest(&path, args),
    }
}

/// Long flags Go's `flag` package lets users spell with one dash.
const GO_LONG_FLAGS: [&str; 13] = [
    "header",
    "reason",
    "url",
    "token",
    "config",
    "instance-set-id",
    "image-id",
    "instance-type",
    "destroy-existing",
    "command",
    "skip-boot-probe",
    "pause-before-destroy",
    "log-format",
];

/// Rewrites `-header`, `-reason R` and `-reason=R` (and the other [`GO_LONG_FLAGS`]) into
/// clap's `--` form, up to a `--` argument.
fn go_style_flags(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut done = false;
    for a in args {
        if !done && let Some(s) = a.to_str() {
            if s == "--" {
                done = true;
            } else if let Some(rest) = s.strip_prefix('-')
                && !rest.starts_with('-')
                && GO_LONG_FLAGS.contains(&rest.split('=').next().unwrap_or_default())
            {
                out.push(format!("-{s}").into());
                continue;
            }
        }
        out.push(a);
    }
    out
}

/// `$ARVADOS_CONFIG` if set (as Arvados honours it), else [`config::DEFAULT_PATH`].
fn default_config_path() -> PathBuf {
    match std::env::var_os("ARVADOS_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(config::DEFAULT_PATH),
    }
}

/// `check-config`.
fn check_config(path: &std::path::Path) -> ExitCode {
    match config::load_file(path).and_then(|loaded| {
        config::check_driver_parameters(&loaded)?;
        Ok(loaded)
    }) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", summary(&loaded));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

/// The human summary of a loaded config. It shows no secret.
fn summary(loaded: &Loaded) -> String {
    let c = &loaded.core;
    let mut out = String::new();
    let listen = match (&loaded.listen, loaded.listen_host_port()) {
        (Some(l), Some(hp)) if *l != hp => format!("{l} ({hp})"),
        (Some(l), _) => l.clone(),
        (None, _) => "(not configured)".into(),
    };
    let max_instances = match c.cloud_vms.max_instances {
        0 => "0 (unlimited)".to_string(),
        n => n.to_string(),
    };
    let fields = [
        ("Cluster", loaded.cluster_id.clone()),
        ("Driver", c.cloud_vms.driver.clone()),
        ("Listen", listen),
        (
            "Controller",
            loaded
                .controller_url
                .clone()
                .unwrap_or_else(|| "(not configured)".into()),
        ),
        ("InstanceSetID", loaded.instance_set_id.clone()),
        ("MaxInstances", max_instances),
    ];
    for (name, value) in fields {
        out.push_str(&format!("{:<15}{value}\n", format!("{name}:")));
    }
    let types = c.types_by_price();
    out.push_str(&format!("\nInstance types ({}, by price):\n", types.len()));
    let mut rows = vec![
        [
            "NAME",
            "PROVIDER TYPE",
            "VCPUS",
            "RAM",
            "SCRATCH",
            "PRICE",
            "PREEMPTIBLE",
            "GPU",
        ]
        .map(String::from),
    ];
    for t in types {
        let gpu = if t.gpu.device_count > 0 {
            let mut g = format!("{} x {}", t.gpu.device_count, t.gpu.stack);
            if !t.gpu.hardware_target.is_empty() {
                g.push_str(&format!(" {}", t.gpu.hardware_target));
            }
            if t.gpu.vram > 0 {
                g.push_str(&format!(", {} each", format_bytes(t.gpu.vram)));
            }
            g.push_str(&format!(", driver {}", t.gpu.driver_version));
            g
        } else {
            "-".into()
        };
        rows.push([
            t.name.clone(),
            t.provider_type.clone(),
            t.vcpus.to_string(),
            format_bytes(t.ram),
            format_bytes(t.scratch),
            format!("${:.3}/h", t.price),
            if t.preemptible { "yes" } else { "no" }.into(),
            gpu,
        ]);
    }
    out.push_str(&table(&rows));
    out
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `instance` and `container` subcommands: management-API clients.
#[cfg(feature = "runtime")]
mod admin {
    use std::path::Path;
    use std::process::ExitCode;

    use clap::{Args, Subcommand};

    use arvados_dispatch_cloud::config;
    use arvados_dispatch_cloud::http::client::{self, AdminClient, EXIT_FAILED, EXIT_USAGE, Token};

    /// Where the dispatchers are and how to authenticate.
    #[derive(Debug, Args)]
    pub struct Remote {
        /// A dispatcher base URL, such as http://localhost:9006 (repeatable) [default: every
        /// Services.DispatchCloud.InternalURLs of the config].
        #[arg(long, global = true, value_name = "URL")]
        url: Vec<String>,
        /// The management token [default: $ARVADOS_MANAGEMENT_TOKEN, else the config's
        /// ManagementToken].
        #[arg(long, global = true, value_name = "TOKEN")]
        token: Option<Token>,
    }

    /// `instance` actions.
    #[derive(Debug, Subcommand)]
    pub enum InstanceAction {
        /// Print the instances: instance, address, state, idle behaviour, config type, provider
        /// type, price and running containers, tab-separated.
        List {
            /// Print column headings first.
            #[arg(long)]
            header: bool,
        },
        /// Stop scheduling new containers on the instances and never shut them down.
        Hold {
            /// Cloud instance IDs.
            #[arg(value_name = "INSTANCE_ID")]
            ids: Vec<String>,
        },
        /// Shut the instances down once they are idle.
        Drain {
            /// Cloud instance IDs.
            #[arg(value_name = "INSTANCE_ID")]
            ids: Vec<String>,
        },
        /// Return the instances to normal behaviour.
        Run {
            /// Cloud instance IDs.
            #[arg(value_name = "INSTANCE_ID")]
            ids: Vec<String>,
        },
        /// Destroy the instances now, whatever runs on them.
        Kill {
            /// Reason to write in the dispatcher's logs.
            #[arg(long, default_value = "")]
            reason: String,
            /// Cloud instance IDs.
            #[arg(value_name = "INSTANCE_ID")]
            ids: Vec<String>,
        },
    }

    /// `container` actions.
    #[derive(Debug, Subcommand)]
    pub enum ContainerAction {
        /// Print the scheduler queue: UUID, state, priority, first eligible provider type, first
        /// seen, scheduling status, tab-separated.
        List {
            /// Print column headings first.
            #[arg(long)]
            header: bool,
        },
        /// Stop the containers' crunch-run processes (SIGTERM).
        Kill {
            /// Reason to write in the dispatcher's logs.
            #[arg(long, default_value = "")]
            reason: String,
            /// Container UUIDs.
            #[arg(value_name = "CONTAINER_UUID")]
            uuids: Vec<String>,
        },
    }

    /// The client for `remote`, with the config filling in what the flags and environment do
    /// not give. Errors are printed here.
    fn connect(path: &Path, remote: &Remote) -> Result<AdminClient, ExitCode> {
        let env_token = std::env::var("ARVADOS_MANAGEMENT_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(Token::new);
        let mut token = remote.token.clone().or(env_token);
        let mut urls = remote.url.clone();
        if token.is_none() || urls.is_empty() {
            let loaded = config::load_file(path).map_err(|e| {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_FAILED)
            })?;
            if token.is_none() {
                token = Some(Token::new(loaded.secrets.management_token.clone()));
            }
            if urls.is_empty() {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                urls = client::dispatch_internal_urls(&text, &loaded.cluster_id);
            }
            if urls.is_empty()
                && let Some(hp) = loaded.listen_host_port()
            {
                // A legacy `Listen: ":9006"` means this host.
                let hp = if hp.starts_with(':') {
                    format!("localhost{hp}")
                } else {
                    hp
                };
                urls.push(format!("http://{hp}"));
            }
        }
        if urls.is_empty() {
            eprintln!("no Services.DispatchCloud.InternalURLs configured");
            return Err(ExitCode::from(EXIT_FAILED));
        }
        let token = token.unwrap_or_else(|| Token::new(""));
        client::install_crypto_provider();
        AdminClient::new(urls, token).map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        })
    }

    fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, ExitCode> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                eprintln!("error: cannot start the async runtime: {e}");
                ExitCode::from(EXIT_FAILED)
            })?;
        Ok(rt.block_on(f))
    }

    fn list_done(r: Result<Result<(), client::ClientError>, ExitCode>) -> ExitCode {
        match r {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_FAILED)
            }
            Err(code) => code,
        }
    }

    fn act(
        path: &Path,
        remote: &Remote,
        api_path: &str,
        id_param: &str,
        ids: &[String],
        reason: Option<&str>,
        what: &str,
    ) -> ExitCode {
        if ids.is_empty() {
            eprintln!("usage error: no {what} provided");
            return ExitCode::from(EXIT_USAGE);
        }
        let c = match connect(path, remote) {
            Ok(c) => c,
            Err(code) => return code,
        };
        let mut err = std::io::stderr();
        match block_on(c.act(api_path, id_param, ids, reason, &mut err)) {
            Ok(code) => ExitCode::from(code),
            Err(code) => code,
        }
    }

    /// `instance ...`.
    pub fn instance(path: &Path, remote: &Remote, action: InstanceAction) -> ExitCode {
        let (name, ids, reason) = match action {
            InstanceAction::List { header } => {
                let c = match connect(path, remote) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                let mut out = std::io::stdout();
                return list_done(block_on(c.list_instances(header, &mut out)));
            }
            InstanceAction::Hold { ids } => ("hold", ids, None),
            InstanceAction::Drain { ids } => ("drain", ids, None),
            InstanceAction::Run { ids } => ("run", ids, None),
            InstanceAction::Kill { ids, reason } => ("kill", ids, Some(reason)),
        };
        act(
            path,
            remote,
            &format!("/arvados/v1/dispatch/instances/{name}"),
            "instance_id",
            &ids,
            reason.as_deref(),
            "instance IDs",
        )
    }

    /// `container ...`.
    pub fn container(path: &Path, remote: &Remote, action: ContainerAction) -> ExitCode {
        match action {
            ContainerAction::List { header } => {
                let c = match connect(path, remote) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                let mut out = std::io::stdout();
                list_done(block_on(c.list_containers(header, &mut out)))
            }
            ContainerAction::Kill { uuids, reason } => act(
                path,
                remote,
                "/arvados/v1/dispatch/containers/kill",
                "container_uuid",
                &uuids,
                Some(&reason),
                "container UUIDs",
            ),
        }
    }
}
