//! The pieces of the `bulkhead` command line that are worth testing alone.

pub mod args;
pub mod colour;
pub mod containers;
pub mod doctor;
pub mod exec;
pub mod flags;
pub mod images;
pub mod kernel_opts;
pub mod manage;
pub mod monitor;
pub mod network;
pub mod run;
pub mod security;
pub mod spec;
pub mod users;

use std::path::PathBuf;

use crate::config::Config;

/// Where images and containers live: `$BULKHEAD_ROOT`, else the config's
/// `state_root`.
pub fn state_root(config: &Config) -> PathBuf {
    std::env::var_os("BULKHEAD_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| config.state_root.clone())
}
