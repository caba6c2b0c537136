//! The shim's logs go to the `log` FIFO containerd made in the bundle (the
//! shim's working directory): containerd copies each line into its own log,
//! tagged with the shim's namespace and id. The shim's stderr goes nowhere.

use std::sync::Mutex;

/// Sends `tracing` output to the `log` FIFO (stderr if there is none), at
/// `level` (a tracing filter such as `info` or `bulkhead=debug`).
pub fn init(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fifo = std::fs::OpenOptions::new().write(true).open("log");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let _ = match fifo {
        Ok(file) => builder.with_writer(Mutex::new(file)).try_init(),
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
}
