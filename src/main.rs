//! The `arvados-dispatch-cloud` command.
//!
//! Subcommands so far: `check-config`, which loads the cluster config, prints its warnings to
//! stderr and a summary to stdout. Exit status: 0 on success, 2 when the config cannot be used
//! (and for usage errors, as clap does). Secrets are never printed.

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
}

/// Exit status for a config that cannot be used.
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.clone().unwrap_or_else(default_config_path);
    match cli.command {
        Command::CheckConfig => check_config(&path),
    }
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
    match config::load_file(path) {
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
