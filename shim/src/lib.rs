//! `bulkhead`: sandbox lifecycle, image store and configuration.
//!
//! The sandbox layer arrives with the "Run a process in a container inside the
//! microVM" capability, the shim and the CLI with the ones after it.
