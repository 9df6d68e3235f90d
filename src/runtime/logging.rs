//! The service's log subscriber: text or JSON lines on stderr, filtered by an `EnvFilter`.
//!
//! Invariant: `trace` applies to this program's own targets only. Other crates (the AWS SDK,
//! hyper, h2, rustls) log at most at `debug`, whatever the filter says, because their trace
//! output includes request headers and credential exchanges (the EC2 instance metadata
//! service's session token, for one).

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::{SubscriberInitExt as _, TryInitError};
use tracing_subscriber::{EnvFilter, Layer as _, filter};

/// The target prefix of this crate's own events.
const OWN_TARGET: &str = "arvados_dispatch_cloud";

/// Whether an event or span at `level` from `target` may be logged at all: anything but
/// `trace`, or `trace` from this crate.
pub fn allowed(level: &tracing::Level, target: &str) -> bool {
    *level != tracing::Level::TRACE || target.starts_with(OWN_TARGET)
}

/// Installs the global subscriber: lines on stderr (JSON objects when `json`), colours only
/// for a terminal, filtered by `env` and by [`allowed`].
pub fn init(env: EnvFilter, json: bool) -> Result<(), TryInitError> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let layer = if json {
        layer.json().flatten_event(true).boxed()
    } else {
        layer.boxed()
    };
    tracing_subscriber::registry()
        .with(
            layer
                .with_filter(env)
                .with_filter(filter::filter_fn(|m| allowed(m.level(), m.target()))),
        )
        .try_init()
}

#[cfg(test)]
mod tests {
    use super::allowed;
    use tracing::Level;

    #[test]
    fn trace_is_ours_only() {
        assert!(allowed(&Level::TRACE, "arvados_dispatch_cloud::cloud::ec2"));
        assert!(!allowed(&Level::TRACE, "aws_smithy_runtime::client::http"));
        assert!(!allowed(&Level::TRACE, "hyper_util::client"));
        assert!(allowed(&Level::DEBUG, "aws_config::imds"));
        assert!(allowed(&Level::INFO, "hyper"));
    }
}
