//! Networking: a bulkhead container on its default CNI bridge against a runc
//! container on the same bridge (same plugins, same conflist, its own
//! namespace), in the same host and run. TCP stream throughput both ways,
//! TCP request/response rate (one connection, netperf's TCP_RR) and HTTP
//! requests with a connection each (busybox httpd, netperf's TCP_CRR), and
//! what the network adds to `bulkhead run`'s start.
//!
//! The tools are the same in both containers (`netprobe`, built here, and
//! busybox's `httpd`) and plain sockets on the host, so both sides pay the
//! same tool costs and the ratios compare the data paths: veth + bridge for
//! runc; veth + tc redirect + tap + virtio-net + the guest's stack for
//! bulkhead.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead::sandbox::network::cni::{self, Attachment, Plugins};
use bulkhead::sandbox::network::netns;

use super::median;
use super::run::{make_runc_bundle, time_run, Inputs};
use crate::{place, workspace};

/// Bytes per stream sample: long enough to dwarf connection set-up.
const STREAM_BYTES: u64 = 64 << 20;
/// HTTP requests (a connection each) per sample.
const REQUESTS: usize = 200;
/// Round trips on one connection per sample.
const ROUND_TRIPS: usize = 2000;
/// The buffer `netprobe work` writes and sums, four rounds over it.
const WORK_MIB: usize = 32;
/// What `netprobe local` moves through a Unix socket pair.
const LOCAL_MIB: usize = 64;
/// The port the containers receive streams on.
const SINK_PORT: u16 = 5001;
/// The host port the containers send streams to.
const SOURCE_PORT: u16 = 5002;
/// The port the containers echo on.
const ECHO_PORT: u16 = 5003;
/// The default network's gateway: the host's address on the bridge.
const GATEWAY: &str = "10.77.0.1";

/// Builds everything outside the emulated host, then measures where KVM runs.
pub fn run(runs: usize) -> Result<()> {
    let target = workspace::root().join("target");
    let inputs = Inputs {
        cli: workspace::release_bin_dir().join("bulkhead"),
        rootfs: target.join("bench").join("net-rootfs"),
        bundle: target.join("bench").join("net-bundle"),
    };
    if !bulkhead_tests::kvm::inside_emulated_host() {
        workspace::build_release_runtime()?;
        crate::rootfs::busybox(&inputs.rootfs)?;
        let probe = build_netprobe()?;
        std::fs::copy(&probe, inputs.rootfs.join("bin/netprobe"))
            .with_context(|| format!("copying {}", probe.display()))?;
        std::fs::create_dir_all(inputs.rootfs.join("www"))?;
        std::fs::write(inputs.rootfs.join("www/index.html"), "ok\n")?;
        make_runc_bundle(&inputs.bundle, &inputs.rootfs)?;
    }
    // One emulated vCPU, as `bench run` (see there why).
    place::run_with_kvm_on("bench net", Some(1), || {
        let root = Path::new("/run/bulkhead-bench-net");
        let result = measure(&inputs, root, runs.max(1));
        let _ = std::fs::remove_dir_all(root);
        result
    })
}

/// What every container runs: httpd, an echo server and a stream sink.
const SERVER_SCRIPT: &str = "httpd -p 80 -h /www; netprobe echo 5003 & exec netprobe sink 5001";

/// Builds `bulkhead-netprobe` static (it runs in a busybox root), in a
/// target dir of its own so its RUSTFLAGS leave the workspace's build alone.
fn build_netprobe() -> Result<PathBuf> {
    let target_dir = workspace::root().join("target").join("netprobe-static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "--release", "-p", "bulkhead-netprobe"])
        .args(["--target", workspace::HOST_TRIPLE])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace::root())
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    ensure!(
        status.success(),
        "building bulkhead-netprobe failed ({status})"
    );
    Ok(target_dir
        .join(workspace::HOST_TRIPLE)
        .join("release")
        .join("bulkhead-netprobe"))
}

/// One side under test: how to reach its container and run commands in it.
trait Side: Sync {
    fn name(&self) -> &'static str;
    fn ip(&self) -> IpAddr;
    /// Runs `script` in the container; returns its standard output.
    fn exec(&self, script: &str) -> Result<String>;
}

fn measure(inputs: &Inputs, root: &Path, runs: usize) -> Result<()> {
    println!(
        "bench net: bulkhead vs runc on the same CNI bridge (10.77.0.0/16), {runs} samples each: \
         {} MiB TCP streams both ways, {ROUND_TRIPS} round trips on one connection, \
         {REQUESTS} HTTP requests (a connection each)",
        STREAM_BYTES >> 20
    );
    let start = start_overhead(inputs, root, runs)?;
    let bulkhead = BulkheadSide::start(inputs, root)?;
    let runc = match RuncSide::start(inputs, root) {
        Ok(r) => r,
        Err(e) => {
            bulkhead.stop();
            return Err(e);
        }
    };
    let result = compare(&[&bulkhead as &dyn Side, &runc], runs);
    runc.stop();
    bulkhead.stop();
    let rows = result?;
    println!("median                      bulkhead        runc   ratio bulkhead/runc");
    for (what, unit, b, r) in &rows {
        println!(
            "  {what:<24} {b:9.1} {unit:<5} {r:9.1} {unit:<5}  {:.2}",
            b / r
        );
    }
    println!(
        "  the ref rows have no network in them: the same user-space work and the same \
         Unix-socket traffic inside each container. They tell the data path's own cost (VM \
         exits, interrupts, the tap, the host's half) from how fast the container's code \
         runs here."
    );
    let [(start_net, start_none), (all_net, all_none)] = start;
    println!(
        "start: `bulkhead run --rm echo` to its output {start_net:.1} ms on the bridge, \
         {start_none:.1} ms with --network none: networking adds {:.0} % (ratio {:.2})",
        (start_net / start_none - 1.0) * 100.0,
        start_net / start_none
    );
    println!(
        "  to its exit, teardown included: {all_net:.1} ms on the bridge, {all_none:.1} ms \
         with --network none (ratio {:.2})",
        all_net / all_none
    );
    Ok(())
}

/// Median times with and without the network, interleaved: to the
/// container's output (its start), and to the end of `run --rm` (the
/// teardown too).
fn start_overhead(inputs: &Inputs, root: &Path, runs: usize) -> Result<[(f64, f64); 2]> {
    let run = |network: &str| {
        let mut c = Command::new(&inputs.cli);
        c.env("BULKHEAD_ROOT", root)
            .args(["run", "--rm", "--network", network, "--rootfs"])
            .arg(&inputs.rootfs)
            .args(["--", "echo", "up"]);
        time_run(c).map(|(first, _, total)| [first, total].map(|t| t.as_secs_f64() * 1e3))
    };
    // Untimed first runs: the VM template, the bridge, the page cache.
    run("bulkhead")?;
    run("none")?;
    let mut samples = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for i in 0..runs {
        let net = run("bulkhead")?;
        let none = run("none")?;
        println!(
            "  start {i:2}: bridge {:7.1} ms ({:7.1} ms to exit), none {:7.1} ms ({:7.1} ms to exit)",
            net[0], net[1], none[0], none[1]
        );
        for k in 0..2 {
            samples[k][0].push(net[k]);
            samples[k][1].push(none[k]);
        }
    }
    Ok(samples.map(|[mut net, mut none]| (median(&mut net), median(&mut none))))
}

type Row = (&'static str, &'static str, f64, f64);

fn compare(sides: &[&dyn Side; 2], runs: usize) -> Result<Vec<Row>> {
    let mut samples: [[Vec<f64>; 6]; 2] = Default::default();
    for i in 0..runs {
        for (k, side) in sides.iter().enumerate() {
            let into = stream_into(side.ip())?;
            let out_of = stream_out_of(*side)?;
            let rr = round_trip_rate(side.ip())?;
            let http = request_rate(side.ip())?;
            let work = probe_rate(*side, "work", WORK_MIB * 4, WORK_MIB)?;
            let local = probe_rate(*side, "local", LOCAL_MIB, LOCAL_MIB)?;
            println!(
                "  sample {i:2} {:<8} host->ctr {into:7.1} MiB/s  ctr->host {out_of:7.1} MiB/s  \
                 {rr:7.1} round trips/s  {http:7.1} HTTP req/s  work {work:7.1} MiB/s  \
                 local {local:7.1} MiB/s",
                side.name()
            );
            for (j, v) in [into, out_of, rr, http, work, local]
                .into_iter()
                .enumerate()
            {
                samples[k][j].push(v);
            }
        }
    }
    let [b, r] = &mut samples;
    Ok(vec![
        (
            "host -> container",
            "MiB/s",
            median(&mut b[0]),
            median(&mut r[0]),
        ),
        (
            "container -> host",
            "MiB/s",
            median(&mut b[1]),
            median(&mut r[1]),
        ),
        (
            "round trips (TCP_RR)",
            "/s",
            median(&mut b[2]),
            median(&mut r[2]),
        ),
        (
            "HTTP requests (TCP_CRR)",
            "/s",
            median(&mut b[3]),
            median(&mut r[3]),
        ),
        (WORK_ROW, "MiB/s", median(&mut b[4]), median(&mut r[4])),
        (LOCAL_ROW, "MiB/s", median(&mut b[5]), median(&mut r[5])),
    ])
}

/// The reference rows, not networking: the container's own user code, and
/// its own kernel.
const WORK_ROW: &str = "ref: user code (work)";
const LOCAL_ROW: &str = "ref: kernel (unix socket)";

/// `netprobe COMMAND ARG` inside the container, timed by itself, as `mib`
/// MiB handled per second.
fn probe_rate(side: &dyn Side, command: &str, mib: usize, arg: usize) -> Result<f64> {
    let out = side.exec(&format!("netprobe {command} {arg}"))?;
    let secs: f64 = out
        .trim()
        .parse()
        .with_context(|| format!("netprobe {command} printed {out:?}"))?;
    ensure!(secs > 0.0, "netprobe {command} took {secs} s");
    Ok(mib as f64 / secs)
}

/// Connects to the container's sink and sends [`STREAM_BYTES`], timed as
/// iperf's sender is: until the last byte is handed to the kernel (what is
/// still in the socket buffer is small next to the stream). The container's
/// `nc` ends when it reads the end of the stream.
fn stream_into(ip: IpAddr) -> Result<f64> {
    let mut s = connect_retrying(SocketAddr::new(ip, SINK_PORT))?;
    let started = Instant::now();
    let chunk = vec![0u8; 1 << 16];
    let mut sent = 0u64;
    while sent < STREAM_BYTES {
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    let elapsed = started.elapsed();
    s.shutdown(Shutdown::Both)?;
    Ok(mib_per_s(sent, elapsed))
}

/// Has the container send [`STREAM_BYTES`] to the host; timed from the
/// connection to its end.
fn stream_out_of(side: &dyn Side) -> Result<f64> {
    let listener = TcpListener::bind((GATEWAY, SOURCE_PORT))
        .with_context(|| format!("listening on {GATEWAY}:{SOURCE_PORT}"))?;
    let script = format!("netprobe send {GATEWAY}:{SOURCE_PORT} {STREAM_BYTES}");
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| side.exec(&script).map(drop));
        let (mut conn, _) = listener.accept()?;
        let started = Instant::now();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        // To the end of the stream: the sender closes its side after the
        // last byte, and waits for this side to close.
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        let elapsed = started.elapsed();
        drop(conn);
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the sender thread panicked"))??;
        ensure!(
            got == STREAM_BYTES,
            "received {got} of {STREAM_BYTES} bytes"
        );
        Ok(mib_per_s(got, elapsed))
    })
}

/// One-byte requests and replies on one connection, one at a time.
fn round_trip_rate(ip: IpAddr) -> Result<f64> {
    let mut s = connect_retrying(SocketAddr::new(ip, ECHO_PORT))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut byte = [0u8; 1];
    let started = Instant::now();
    for _ in 0..ROUND_TRIPS {
        s.write_all(b"x")?;
        s.read_exact(&mut byte).context("the echo server's reply")?;
    }
    Ok(ROUND_TRIPS as f64 / started.elapsed().as_secs_f64())
}

/// Sequential HTTP requests, each on a new connection, to busybox httpd.
fn request_rate(ip: IpAddr) -> Result<f64> {
    let addr = SocketAddr::new(ip, 80);
    drop(connect_retrying(addr)?);
    let started = Instant::now();
    for _ in 0..REQUESTS {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)?;
        ensure!(
            reply.starts_with(b"HTTP/1.0 200") || reply.starts_with(b"HTTP/1.1 200"),
            "httpd answered {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(80)])
        );
    }
    Ok(REQUESTS as f64 / started.elapsed().as_secs_f64())
}

fn connect_retrying(addr: SocketAddr) -> Result<TcpStream> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > until => bail!("connecting to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

/// A detached `bulkhead run` on the default network.
struct BulkheadSide {
    cli: PathBuf,
    root: PathBuf,
    ip: IpAddr,
}

const BULKHEAD_NAME: &str = "bench-net";

impl BulkheadSide {
    fn start(inputs: &Inputs, root: &Path) -> Result<BulkheadSide> {
        let cli = |args: &[&str]| {
            let mut c = Command::new(&inputs.cli);
            c.env("BULKHEAD_ROOT", root).args(args);
            c
        };
        let out = cli(&["run", "-d", "--name", BULKHEAD_NAME, "--rootfs"])
            .arg(&inputs.rootfs)
            .args(["--", "sh", "-c", SERVER_SCRIPT])
            .output()
            .context("bulkhead run -d")?;
        ensure!(
            out.status.success(),
            "bulkhead run -d: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let side = BulkheadSide {
            cli: inputs.cli.clone(),
            root: root.to_owned(),
            ip: IpAddr::from([0, 0, 0, 0]),
        };
        let inspect = cli(&["inspect", BULKHEAD_NAME]).output()?;
        let json: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap_or_default();
        let ip = json[0]["NetworkSettings"]["IPAddress"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match ip.parse() {
            Ok(ip) => Ok(BulkheadSide { ip, ..side }),
            Err(_) => {
                side.stop();
                bail!(
                    "bulkhead inspect shows no address: {}",
                    String::from_utf8_lossy(&inspect.stdout)
                )
            }
        }
    }

    fn stop(&self) {
        let _ = Command::new(&self.cli)
            .env("BULKHEAD_ROOT", &self.root)
            .args(["rm", "-f", BULKHEAD_NAME])
            .stdout(Stdio::null())
            .status();
    }
}

impl Side for BulkheadSide {
    fn name(&self) -> &'static str {
        "bulkhead"
    }
    fn ip(&self) -> IpAddr {
        self.ip
    }
    fn exec(&self, script: &str) -> Result<String> {
        let mut c = Command::new(&self.cli);
        c.env("BULKHEAD_ROOT", &self.root)
            .args(["exec", BULKHEAD_NAME, "sh", "-c", script]);
        exec_output(c, "bulkhead exec")
    }
}

/// A detached `runc run` in a namespace the same CNI list wired.
struct RuncSide {
    attachment: Attachment,
    ip: IpAddr,
}

const RUNC_ID: &str = "bench-net-runc";

impl RuncSide {
    fn start(inputs: &Inputs, root: &Path) -> Result<RuncSide> {
        let config = bulkhead::config::Config::load().context("loading bulkhead's config")?;
        std::env::set_var("BULKHEAD_ROOT", root);
        let conflist =
            bulkhead::cli::network::conflist(&config, bulkhead::cli::network::DEFAULT_NETWORK)?;
        let ns = root.join("runc-netns");
        netns::create(&ns)?;
        let mut attachment = Attachment {
            container_id: RUNC_ID.into(),
            netns: ns.clone(),
            ifname: "eth0".into(),
            conflist,
            port_mappings: Vec::new(),
            result: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        if let Err(e) = runtime.block_on(cni::add(&Plugins::system(), &mut attachment)) {
            let _ = netns::remove(&ns);
            bail!("CNI ADD for runc: {e}");
        }
        let side = RuncSide {
            ip: IpAddr::from([0, 0, 0, 0]),
            attachment,
        };
        let ip = side
            .attachment
            .result
            .as_ref()
            .and_then(|r| cni::result_addresses(r).into_iter().next())
            .and_then(|a| a.split('/').next().and_then(|ip| ip.parse().ok()));
        let Some(ip) = ip else {
            side.stop();
            bail!("CNI gave runc's namespace no address");
        };
        let side = RuncSide { ip, ..side };
        if let Err(e) = side.run(inputs, &ns) {
            side.stop();
            return Err(e);
        }
        Ok(side)
    }

    /// `runc run -d` with the bundle's config, in namespace `ns`.
    fn run(&self, inputs: &Inputs, ns: &Path) -> Result<()> {
        let bundle = inputs.bundle.with_file_name("net-bundle-run");
        std::fs::create_dir_all(&bundle)?;
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(inputs.bundle.join("config.json"))?)?;
        config["process"]["args"] = serde_json::json!(["sh", "-c", SERVER_SCRIPT]);
        for n in config["linux"]["namespaces"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            if n["type"] == "network" {
                n["path"] = serde_json::json!(ns);
            }
        }
        std::fs::write(bundle.join("config.json"), config.to_string())?;
        let status = Command::new("runc")
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg(RUNC_ID)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("runc run -d")?;
        ensure!(status.success(), "runc run -d: {status}");
        Ok(())
    }

    fn stop(&self) {
        let _ = Command::new("runc")
            .args(["delete", "-f", RUNC_ID])
            .stderr(Stdio::null())
            .status();
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            if let Err(e) = runtime.block_on(cni::del(&Plugins::system(), &self.attachment)) {
                eprintln!("bench net: CNI DEL for runc: {e}");
            }
        }
        let _ = netns::remove(&self.attachment.netns);
    }
}

impl Side for RuncSide {
    fn name(&self) -> &'static str {
        "runc"
    }
    fn ip(&self) -> IpAddr {
        self.ip
    }
    fn exec(&self, script: &str) -> Result<String> {
        let mut c = Command::new("runc");
        c.args(["exec", RUNC_ID, "sh", "-c", script]);
        exec_output(c, "runc exec")
    }
}

/// Runs an exec command `c` (standard error shown), its output as text.
fn exec_output(mut c: Command, what: &str) -> Result<String> {
    let out = c
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {what}"))?;
    ensure!(out.status.success(), "{what}: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
