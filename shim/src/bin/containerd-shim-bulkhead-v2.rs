//! containerd's shim for the `io.containerd.bulkhead.v2` runtime: see
//! `bulkhead::containerd`.

#[tokio::main]
async fn main() {
    bulkhead::containerd::main().await;
}
