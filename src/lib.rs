//! # arvados-dispatch-cloud
//!
//! A drop-in replacement for the Arvados cloud dispatcher, built simulation-first.
//!
//! The crate is split the way the data flows:
//!
//! * [`core`] is a pure, sans-IO state machine (in the shape of quinn-proto): it takes facts
//!   (`Input`s) and the current time, and emits intents (`Command`s) and a wake-up time. It holds
//!   the container queue, the scheduler, the worker pool, every rate limit, back-off and deadline.
//! * [`config`] reads the Arvados cluster config (`/etc/arvados/config.yml`, current and legacy
//!   layouts) into a validated [`core::Config`] plus the secrets the adapters need.
//! * The production shell, the controller client, SSH, cloud drivers and the management API wrap
//!   the same core; the `dispatch-sim` crate drives it with simulated clouds instead.
//!
//! See `docs/architecture.md` for the full picture.

#![warn(missing_docs)]

pub mod config;
pub mod core;

#[cfg(feature = "runtime")]
pub mod arvados;
#[cfg(feature = "runtime")]
pub mod cloud;
#[cfg(feature = "runtime")]
pub mod cloudtest;
#[cfg(feature = "runtime")]
pub mod http;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "runtime")]
pub mod ssh;
