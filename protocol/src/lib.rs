//! The agent API shared by the host-side shim and the guest agent.
//!
//! Each bulkhead container runs in a KVM microVM whose PID 1 is
//! `bulkhead-agent`. The agent serves the [`agent_ttrpc::Agent`] service with
//! ttrpc on vsock; the shim (`bulkhead` crate) calls it with
//! [`agent_ttrpc::AgentClient`]. This crate is the one place where both sides
//! get what they must agree on, so neither copies it:
//!
//! - [`agent`]: the request and reply messages, generated at build time from
//!   `proto/agent.proto` (package `bulkhead.agent.v1`) by `ttrpc-codegen`, a
//!   pure-Rust generator (no `protoc` needed). OCI structures travel as JSON
//!   bytes: `oci-spec`'s serde types are the source of truth on both sides.
//! - [`agent_ttrpc`]: the async (tokio) ttrpc client, server trait and
//!   [`agent_ttrpc::create_agent`] service registration.
//! - [`network`]: the sandbox network's values ([`network::GuestNetwork`]),
//!   parsed the same way on both sides.
//! - [`stream`]: the header that opens a stdio stream. Stdio does not travel
//!   over ttrpc: every stream of every process has its own vsock connection.
//! - [`limits`]: the size limit of every message field, the id rules
//!   ([`limits::validate_id`]) and the vsock ports; [`Validate`] applies
//!   them to each message. The guest is untrusted: the host validates every
//!   reply.
//! - [`ttrpc`], [`protobuf`] and [`async_trait`] re-exported, so users need
//!   not pin versions that match the generated code.
//!
//! # Connections
//!
//! | vsock port | who listens | what |
//! | --- | --- | --- |
//! | [`AGENT_TTRPC_PORT`] (1024) | agent | ttrpc, this API |
//! | [`AGENT_STREAM_PORT`] (1025) | agent | stdio streams, [`stream::StreamHeader`] first |
//! | [`HOST_READY_PORT`] (1026) | host | the agent dials it once it takes requests |
//! | [`AGENT_RESUME_PORT`] (1027) | agent | a VM resumed from a template: the host's go |
//!
//! # Host side: a client over an already-connected socket
//!
//! The VMM's hybrid vsock is a host Unix socket: the shim connects, writes
//! `CONNECT 1024\n`, reads `OK <host port>\n`, and from then on the same
//! socket is a byte stream to the agent's port. ttrpc 0.10 takes any
//! connected tokio stream: wrap it in
//! [`ttrpc::asynchronous::transport::Socket`] (`Socket::from(UnixStream)`, or
//! `Socket::new(s)` for any `AsyncRead + AsyncWrite + Send + Sync + 'static`)
//! and hand that to [`ttrpc::asynchronous::Client::new`] (inside a tokio
//! runtime: it spawns the connection's task). Read the `OK` line without a
//! buffer that could swallow the first ttrpc bytes: byte by byte as below,
//! or keep using the `BufReader` itself as the socket (tokio's `BufReader`
//! passes writes through).
//!
//! ```no_run
//! use bulkhead_protocol::agent::CheckRequest;
//! use bulkhead_protocol::agent_ttrpc::AgentClient;
//! use bulkhead_protocol::ttrpc::asynchronous::{transport::Socket, Client};
//! use bulkhead_protocol::{ttrpc, AGENT_TTRPC_PORT};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # async fn connect(vsock_uds: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
//! let mut s = tokio::net::UnixStream::connect(vsock_uds).await?;
//! s.write_all(format!("CONNECT {AGENT_TTRPC_PORT}\n").as_bytes()).await?;
//! let mut line = Vec::new();
//! while line.last() != Some(&b'\n') && line.len() < 32 {
//!     line.push(s.read_u8().await?);
//! }
//! if !line.starts_with(b"OK ") {
//!     return Err("the VMM refused the vsock connection".into());
//! }
//! let agent = AgentClient::new(Client::new(Socket::from(s)));
//! let ctx = ttrpc::context::with_duration(std::time::Duration::from_secs(5));
//! let reply = agent.check(ctx, &CheckRequest::new()).await?;
//! # let _ = reply; Ok(()) }
//! ```
//!
//! A `ttrpc::context::Context` with a zero timeout (`Context::default()`)
//! waits forever: use that only for the blocking calls (`WaitProcess`,
//! `GetOomEvent`).
//!
//! # Guest side: a server on AF_VSOCK
//!
//! ttrpc's async server binds vsock itself (through `tokio-vsock`, enabled by
//! ttrpc's `async` feature on Linux): the address `vsock://-1:1024` means
//! CID `VMADDR_CID_ANY` (the `-1`), port 1024. `Server::start` spawns the
//! accept loop and returns; the agent then awaits its own shutdown signal.
//! An already-bound vsock listener fd can be passed instead with the unsafe
//! `Server::add_vsock_listener(fd)`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use bulkhead_protocol::agent::{CheckRequest, CheckResponse};
//! use bulkhead_protocol::agent_ttrpc::{create_agent, Agent};
//! use bulkhead_protocol::ttrpc::{self, asynchronous::{Server, TtrpcContext}};
//! use bulkhead_protocol::AGENT_TTRPC_PORT;
//!
//! struct MyAgent;
//!
//! #[bulkhead_protocol::async_trait::async_trait]
//! impl Agent for MyAgent {
//!     async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
//!         let mut r = CheckResponse::new();
//!         r.version = env!("CARGO_PKG_VERSION").into();
//!         r.ready = true;
//!         r.api_version = bulkhead_protocol::API_VERSION;
//!         Ok(r)
//!     }
//! }
//!
//! # async fn serve() -> ttrpc::Result<()> {
//! let mut server = Server::new()
//!     .bind(&format!("vsock://-1:{AGENT_TTRPC_PORT}"))?
//!     .register_service(create_agent(Arc::new(MyAgent)));
//! server.start().await?;
//! // ... run until told to stop, then:
//! server.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Methods the agent does not implement answer `NOT_FOUND` (the generated
//! trait's defaults).
//!
//! # Versions
//!
//! ttrpc 0.10 (async, rust-protobuf), protobuf 3.7, ttrpc-codegen 0.7 (which
//! generates for ttrpc 0.10 through ttrpc-compiler 0.9).

#![warn(missing_docs)]

// `agent` and `agent_ttrpc`: the generated modules, declared by a file that
// build.rs writes (the generated files carry their own `#![allow(...)]`,
// `missing_docs` included).
include!(concat!(env!("OUT_DIR"), "/generated.rs"));

pub mod limits;
pub mod network;
pub mod stream;
mod validate;

pub use async_trait;
pub use limits::{
    validate_exec_id, validate_id, ValidationError, AGENT_RESUME_PORT, AGENT_STREAM_PORT,
    AGENT_TTRPC_PORT, HOST_READY_PORT,
};
pub use protobuf;
pub use ttrpc;
pub use validate::Validate;

/// The revision of the agent API this crate defines, reported by the agent
/// in `CheckResponse.api_version`. Bumped on any change the other side must
/// know of; the host refuses an agent with another revision.
pub const API_VERSION: u32 = 1;
