//! `testhost-run [OPTIONS] -- COMMAND [ARGS...]`: run one command in the emulated
//! hardware-KVM host and exit with its status.
//!
//! For developers: try things inside the emulated host by hand, e.g.
//! `cargo run -p bulkhead-tests --bin testhost-run -- sh -c 'ls -l /dev/kvm'`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bulkhead_tests::TestHost;

const USAGE: &str = "usage: testhost-run [--memory MIB] [--vcpus N] [--timeout SECS] \
[--stall SECS] [--env NAME=VALUE]... [--cwd DIR] [--prefetch] -- COMMAND [ARGS...]

Runs COMMAND inside the emulated hardware-KVM host (QEMU TCG, -cpu EPYC, this
machine's / read-only under a tmpfs overlay) and exits with its status.
--prefetch only fetches and caches the kernel and initramfs.";

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("testhost-run: {err:#}");
            ExitCode::from(125)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let mut args = std::env::args().skip(1);
    let mut builder = TestHost::builder();
    let mut env = Vec::new();
    let mut cwd = std::env::current_dir().context("reading the current directory")?;
    let mut prefetch = false;
    let mut argv: Vec<String> = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--" => {
                argv = args.by_ref().collect();
                break;
            }
            "--memory" => builder = builder.memory_mib(value("--memory")?.parse()?),
            "--vcpus" => builder = builder.vcpus(value("--vcpus")?.parse()?),
            "--timeout" => {
                builder = builder.timeout(Duration::from_secs(value("--timeout")?.parse()?))
            }
            "--stall" => {
                builder = builder.stall_timeout(Duration::from_secs(value("--stall")?.parse()?))
            }
            "--env" => {
                let pair = value("--env")?;
                let (name, val) = pair
                    .split_once('=')
                    .with_context(|| format!("--env {pair}: expected NAME=VALUE"))?;
                env.push((name.to_string(), val.to_string()));
            }
            "--cwd" => cwd = value("--cwd")?.into(),
            "--prefetch" => prefetch = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    let started = Instant::now();
    if prefetch {
        let assets = bulkhead_tests::ensure_assets()?;
        println!(
            "kernel {} ({} {})\ninitramfs {}",
            assets.kernel.display(),
            assets.kernel_package,
            assets.kernel_version,
            assets.initramfs.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if argv.is_empty() {
        bail!("no command given\n{USAGE}");
    }
    let host = builder.build()?;
    let outcome = host.run(&argv, &env, &cwd)?;
    eprintln!(
        "testhost-run: command exited with {} after {:.1} s in total",
        outcome.exit_code,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::from(
        u8::try_from(outcome.exit_code).unwrap_or(255),
    ))
}
