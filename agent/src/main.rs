//! `bulkhead-agent`, the guest's PID 1.
//!
//! The agent (ttrpc over vsock, containers via libcontainer) is the subject of the
//! "Run a process in a container inside the microVM" capability; this crate holds its
//! place in the workspace until then.

fn main() {
    eprintln!("bulkhead-agent: not built yet (see the project's open issues)");
    std::process::exit(1);
}
