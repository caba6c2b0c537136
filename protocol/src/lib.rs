//! The agent API (ttrpc) shared by the shim and the agent.
//!
//! Filled by the "Run a process in a container inside the microVM" capability: the
//! `.proto`, the generated ttrpc code and the stdio stream header live here so that
//! neither side copies them.
