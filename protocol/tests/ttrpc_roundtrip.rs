//! The generated async ttrpc code works end to end: a dummy `Agent` served on a
//! Unix socket answers `Check`, directly and after a hybrid-vsock style
//! `CONNECT <port>` handshake on the same socket; and the server can bind
//! AF_VSOCK with `vsock://-1:PORT`.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_protocol::agent::{CheckRequest, CheckResponse, StartContainerRequest};
use bulkhead_protocol::agent_ttrpc::{create_agent, Agent, AgentClient};
use bulkhead_protocol::ttrpc::asynchronous::transport::{Listener, Socket};
use bulkhead_protocol::ttrpc::asynchronous::{Client, Server, TtrpcContext};
use bulkhead_protocol::{ttrpc, Validate, AGENT_TTRPC_PORT, API_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

struct DummyAgent;

#[bulkhead_protocol::async_trait::async_trait]
impl Agent for DummyAgent {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
        let mut r = CheckResponse::new();
        r.version = "9.9.9-test".into();
        r.ready = true;
        r.api_version = API_VERSION;
        Ok(r)
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(Duration::from_secs(10))
}

async fn assert_check(agent: &AgentClient) {
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        agent.check(ctx(), &CheckRequest::new()),
    )
    .await
    .expect("Check timed out")
    .expect("Check failed");
    assert_eq!(reply.validate(), Ok(()));
    assert_eq!(reply.version, "9.9.9-test");
    assert!(reply.ready);
    assert_eq!(reply.api_version, API_VERSION);
}

#[tokio::test]
async fn check_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}", dir.path().join("agent.sock").display());
    let mut server = Server::new()
        .bind(&addr)
        .unwrap()
        .register_service(create_agent(Arc::new(DummyAgent)));
    server.start().await.unwrap();

    let agent = AgentClient::new(Client::connect(&addr).await.unwrap());
    assert_check(&agent).await;

    // A method the dummy does not implement answers NOT_FOUND.
    let mut req = StartContainerRequest::new();
    req.container_id = "ctr".into();
    match agent.start_container(ctx(), &req).await {
        Err(ttrpc::Error::RpcStatus(status)) => {
            assert_eq!(status.code(), ttrpc::Code::NOT_FOUND, "{status:?}")
        }
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }

    server.shutdown().await.unwrap();
}

/// Stands in for the VMM's hybrid vsock socket: accepts one connection,
/// reads `CONNECT <port>\n`, answers `OK <n>\n`, then hands the very same
/// socket to a ttrpc server (as the guest end would be).
#[tokio::test]
async fn check_after_a_connect_handshake_on_the_same_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock.sock");
    let vmm = UnixListener::bind(&path).unwrap();

    let (to_server_tx, to_server_rx) = tokio::sync::mpsc::channel::<std::io::Result<Socket>>(1);
    tokio::spawn(async move {
        let (conn, _) = vmm.accept().await.unwrap();
        // The VMM side may buffer: nothing follows CONNECT until OK is sent.
        let mut conn = BufReader::new(conn);
        let mut line = String::new();
        conn.read_line(&mut line).await.unwrap();
        assert_eq!(line, format!("CONNECT {AGENT_TTRPC_PORT}\n"));
        conn.write_all(b"OK 1073741824\n").await.unwrap();
        to_server_tx
            .send(Ok(Socket::new(conn.into_inner())))
            .await
            .unwrap();
        // Keep the sender alive so the listener stream does not end.
        std::future::pending::<()>().await;
    });
    let incoming = futures::stream::unfold(to_server_rx, |mut rx| async move {
        rx.recv().await.map(|s| (s, rx))
    });
    let mut server = Server::new()
        .add_listener(Listener::new(incoming))
        .register_service(create_agent(Arc::new(DummyAgent)));
    server.start().await.unwrap();

    // The host side: handshake, then ttrpc on the same connected socket.
    let mut s = UnixStream::connect(&path).await.unwrap();
    s.write_all(format!("CONNECT {AGENT_TTRPC_PORT}\n").as_bytes())
        .await
        .unwrap();
    // Byte by byte, so that no ttrpc byte is swallowed by a read buffer.
    let mut line = Vec::new();
    while line.last() != Some(&b'\n') {
        assert!(line.len() < 32, "reply too long");
        line.push(s.read_u8().await.unwrap());
    }
    assert!(line.starts_with(b"OK "), "{line:?}");
    let agent = AgentClient::new(Client::new(Socket::from(s)));
    assert_check(&agent).await;
    assert_check(&agent).await;

    server.shutdown().await.unwrap();
}

/// The agent's listener: `vsock://-1:PORT` binds AF_VSOCK on any CID. Only
/// the bind is checked (a host without vsock_loopback cannot connect to
/// itself); skipped where the kernel has no AF_VSOCK at all.
#[tokio::test]
async fn server_binds_vsock_any_cid() {
    let port = 40_000 + std::process::id() % 20_000;
    let result = Server::new().bind(&format!("vsock://-1:{port}"));
    let mut server = match result {
        Ok(server) => server,
        Err(e) => {
            let msg = e.to_string();
            // EAFNOSUPPORT: no vsock in this kernel.
            if msg.contains("not supported") || msg.contains("os error 97") {
                eprintln!("skipped: no AF_VSOCK here ({msg})");
                return;
            }
            panic!("binding vsock://-1:{port} failed: {msg}");
        }
    }
    .register_service(create_agent(Arc::new(DummyAgent)));
    server.start().await.unwrap();
    server.shutdown().await.unwrap();

    // Malformed vsock addresses are refused, not misparsed.
    assert!(Server::new().bind("vsock://1024").is_err());
    assert!(Server::new().bind("vsock://x:1024").is_err());
}
