//! The pure core: every scheduling and worker-pool decision, and nothing else.
//!
//! No async, no clock, no I/O, no threads, no environment, no global RNG. `now` and the seed come
//! in as arguments; commands go out as values. The same code runs under the production shell
//! (`crate::runtime`) and the simulator (`dispatch-sim`). `clippy.toml` forbids the clock and the
//! OS random source here, and `cargo build --no-default-features` proves the core builds alone.

#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod config;
pub mod rng;
pub mod time;
pub mod types;

pub use config::Config;
pub use time::Timestamp;
pub mod command;
pub mod dispatcher;
pub mod fastcmp;
pub mod invariants;
pub mod key;
pub mod metrics;
pub mod ops;
pub mod pool;
pub mod price;
pub mod queue;
pub mod scheduler;
pub mod select;
pub mod snapshot;

pub use command::{Command, CommandKind, Input, OpId};
pub use dispatcher::{Dispatcher, Options};
