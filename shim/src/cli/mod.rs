//! The pieces of the `bulkhead` command line that are worth testing alone.

pub mod artifacts;
pub mod doctor;
pub mod exec;
pub mod process_io;
pub mod run;
pub mod spec;
