//! `bulkhead-runtime`: runc's command line for podman, Docker 20.10,
//! buildah and containerd's runc shim; see `bulkhead::runtime`.

fn main() {
    std::process::exit(bulkhead::runtime::main());
}
