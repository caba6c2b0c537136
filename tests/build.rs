//! Generates the tests' CRI (`runtime.v1`) client from `proto/runtime/v1/api.proto`.
//!
//! The proto is compiled by `protox`, a pure-Rust protobuf compiler, and the
//! tonic client is generated from its descriptor set: no `protoc` binary is
//! needed, so `cargo xtask setup` (which depends on this crate) builds on a
//! machine that has nothing but a Rust toolchain and a C compiler. Only the
//! client is generated; the tests never serve CRI.

fn main() {
    const PROTO: &str = "proto/runtime/v1/api.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");

    let descriptors = match protox::compile([PROTO], ["proto"]) {
        Ok(descriptors) => descriptors,
        Err(e) => panic!("compiling {PROTO} failed: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)
    {
        panic!("generating the CRI client from {PROTO} failed: {e}");
    }
}
