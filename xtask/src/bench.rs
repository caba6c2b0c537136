//! `cargo xtask bench`: bulkhead against a reference, in the same host and the
//! same run, reported as ratios (absolute times under emulation mean little).

mod boot;
mod cli;
mod ctr;
mod net;
mod oci;
mod run;

use anyhow::Result;

/// The benchmarks there are.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Which {
    /// Boot to a ready marker: bulkhead-vmm vs QEMU microvm, same kernel and initrd.
    Boot,
    /// Containers: `bulkhead run` vs `runc run` (start, stdout throughput, memory).
    Run,
    /// containerd: `ctr run` with the bulkhead runtime vs runc's, and ten at once.
    Ctr,
    /// The CLI with an image: `bulkhead run --rm busybox true` vs `runc run`.
    Cli,
    /// Networking on the CNI bridge vs runc on the same bridge: TCP streams
    /// both ways, request rate, and what the network adds to start.
    Net,
    /// podman with `--runtime bulkhead-runtime` vs runc and crun:
    /// `podman run --rm IMAGE true`.
    Oci,
}

/// Runs benchmark `which` with `runs` samples per side.
pub fn run(which: Which, runs: usize) -> Result<()> {
    match which {
        Which::Boot => boot::run(runs),
        Which::Run => run::run(runs),
        Which::Ctr => ctr::run(runs),
        Which::Cli => cli::run(runs),
        Which::Net => net::run(runs),
        Which::Oci => oci::run(runs),
    }
}

/// The median of `values` (upper median for an even count); 0 for none.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(&mut []), 0.0);
    }
}
