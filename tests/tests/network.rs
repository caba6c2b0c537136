//! End-to-end: `bulkhead run` puts its microVM on a CNI bridge network. The
//! container has an address and a default route inside the VM, reaches a
//! server on the host, publishes ports with `-p`, talks to another
//! container, and leaves no veth, namespace, lease or tap behind.
//!
//! Traffic stays inside the emulated host: its loopback and the bridge the
//! CLI made there. (Debian's static busybox `wget -T` crashes, so the
//! containers bound their fetches with `timeout` instead.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;

const DEADLINE: Duration = Duration::from_secs(240);
/// The default network's gateway: the host's end of the bridge.
const GATEWAY: &str = "10.77.0.1";

fn main() -> ExitCode {
    common::main("network", || {
        vec![
            common::trial(
                "container_has_an_address_and_reaches_the_host",
                container_has_an_address_and_reaches_the_host,
            ),
            common::trial(
                "published_port_reaches_the_container",
                published_port_reaches_the_container,
            ),
            common::trial(
                "two_containers_talk_by_address",
                two_containers_talk_by_address,
            ),
            common::trial(
                "bad_network_flags_leave_nothing",
                bad_network_flags_leave_nothing,
            ),
            common::trial(
                "containers_on_a_user_network_find_each_other_by_name",
                containers_on_a_user_network_find_each_other_by_name,
            ),
            common::trial(
                "egress_policy_is_enforced_on_the_host",
                egress_policy_is_enforced_on_the_host,
            ),
        ]
    })
}

fn cli() -> PathBuf {
    common::bulkhead_cli()
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn bulkhead(args: &[&str]) -> Result<Out, Failed> {
    let mut child = Command::new(cli())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (mut out, mut err) = (
        child.stdout.take().ok_or("stdout")?,
        child.stderr.take().ok_or("stderr")?,
    );
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let until = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("bulkhead {args:?} did not finish within {DEADLINE:?}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Out {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn expect_ok(out: &Out, what: &str) -> Result<(), Failed> {
    if out.code != 0 {
        return Err(format!(
            "{what}: exit {}\nstdout: {}\nstderr: {}",
            out.code, out.stdout, out.stderr
        )
        .into());
    }
    Ok(())
}

/// A busybox rootfs with a web root holding `index.html` = `text`.
fn rootfs_serving(text: &str) -> Result<tempfile::TempDir, Failed> {
    let dir = tempfile::tempdir()?;
    common::busybox_rootfs(dir.path())?;
    std::fs::create_dir_all(dir.path().join("www"))?;
    std::fs::write(dir.path().join("www/index.html"), text)?;
    Ok(dir)
}

/// busybox httpd on the host, serving `dir` on `addr:port`, until dropped.
struct HostServer(std::process::Child);

impl HostServer {
    fn start(dir: &Path, port: u16) -> Result<HostServer, Failed> {
        let child = Command::new("/bin/busybox")
            .args(["httpd", "-f", "-p"])
            .arg(format!("0.0.0.0:{port}"))
            .arg("-h")
            .arg(dir)
            .spawn()?;
        Ok(HostServer(child))
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything the network made is gone: no veth, no pinned namespace, no
/// IPAM lease, no per-container iptables chain, and no VM process.
fn network_left_nothing() -> Result<(), Failed> {
    common::nothing_left(&["bulkhead-vmm", "virtiofsd"])?;
    let chains = per_container_chains(&iptables_save()?);
    if !chains.is_empty() {
        return Err(format!("per-container iptables chains left: {chains:?}").into());
    }
    let root = PathBuf::from(std::env::var("BULKHEAD_ROOT").unwrap_or_default());
    let leases = root.join("cni/ipam/bulkhead");
    let held: Vec<String> = common::listing(&leases)
        .into_iter()
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    if !held.is_empty() {
        return Err(format!("IPAM leases left in {}: {held:?}", leases.display()).into());
    }
    Ok(())
}

fn iptables_save() -> Result<String, Failed> {
    let out = Command::new("iptables-save").output()?;
    if !out.status.success() {
        return Err(format!("iptables-save: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The chains CNI makes for one container (portmap's `CNI-DN-*`, the bridge
/// plugin's masquerade `CNI-<hash>`), and any rule still jumping to one:
/// only the plugins' shared chains may outlive the containers.
fn per_container_chains(saved: &str) -> Vec<String> {
    const SHARED: &[&str] = &[
        "CNI-HOSTPORT-DNAT",
        "CNI-HOSTPORT-SETMARK",
        "CNI-HOSTPORT-MASQ",
        "CNI-FORWARD",
        "CNI-ADMIN",
    ];
    saved
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("CNI-") && !SHARED.contains(c))
        .map(str::to_owned)
        .collect()
}

fn container_has_an_address_and_reaches_the_host() -> Result<(), Failed> {
    let rootfs = rootfs_serving("unused")?;
    let served = tempfile::tempdir()?;
    std::fs::write(served.path().join("hello.txt"), "hello from the host\n")?;
    let _server = HostServer::start(served.path(), 18081)?;
    let script = format!(
        "ip -4 addr show eth0; ip route; cat /etc/resolv.conf >/dev/null; \
         timeout 30 wget -q -O - http://{GATEWAY}:18081/hello.txt"
    );
    let out = bulkhead(&[
        "run",
        "--rm",
        "--rootfs",
        rootfs.path().to_str().ok_or("path")?,
        "--",
        "sh",
        "-c",
        &script,
    ])?;
    expect_ok(&out, "ip addr; ip route; wget from the host")?;
    if !out.stdout.contains("inet 10.77.") {
        return Err(format!("eth0 has no address on 10.77.0.0/16:\n{}", out.stdout).into());
    }
    if !out.stdout.contains(&format!("default via {GATEWAY}")) {
        return Err(format!("no default route via {GATEWAY}:\n{}", out.stdout).into());
    }
    if !out.stdout.contains("hello from the host") {
        return Err(format!("the host's file did not arrive:\n{}", out.stdout).into());
    }
    network_left_nothing()
}

/// Reads `http://127.0.0.1:port/` on the host, retrying while the
/// container's server comes up.
fn fetch_local(port: u16) -> Result<String, Failed> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if body.contains("200") => return Ok(body),
            Ok(body) if Instant::now() > until => {
                return Err(format!("127.0.0.1:{port} answered {body:?}").into())
            }
            Err(e) if Instant::now() > until => return Err(format!("127.0.0.1:{port}: {e}").into()),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn published_port_reaches_the_container() -> Result<(), Failed> {
    let rootfs = rootfs_serving("served from inside the microVM")?;
    let name = "published";
    let out = bulkhead(&[
        "run",
        "-d",
        "--name",
        name,
        "-p",
        "127.0.0.1:18082:80",
        "--rootfs",
        rootfs.path().to_str().ok_or("path")?,
        "--",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])?;
    expect_ok(&out, "run -d -p")?;
    let fetched = fetch_local(18082);
    let inspect = bulkhead(&["inspect", name])?;
    let removed = bulkhead(&["rm", "-f", name])?;
    let body = fetched?;
    if !body.contains("served from inside the microVM") {
        return Err(format!("unexpected answer: {body:?}").into());
    }
    expect_ok(&inspect, "inspect")?;
    if !inspect.stdout.contains("\"80/tcp\"") || !inspect.stdout.contains("\"IPAddress\": \"10.77.")
    {
        return Err(format!(
            "inspect does not show the port and address:\n{}",
            inspect.stdout
        )
        .into());
    }
    expect_ok(&removed, "rm -f")?;
    network_left_nothing()
}

fn two_containers_talk_by_address() -> Result<(), Failed> {
    let rootfs = rootfs_serving("from the first container")?;
    let server = "talk-server";
    let out = bulkhead(&[
        "run",
        "-d",
        "--name",
        server,
        "--rootfs",
        rootfs.path().to_str().ok_or("path")?,
        "--",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])?;
    expect_ok(&out, "run -d httpd")?;
    let result = (|| -> Result<(), Failed> {
        let inspect = bulkhead(&["inspect", server])?;
        expect_ok(&inspect, "inspect")?;
        let ip = inspect
            .stdout
            .split("\"IPAddress\": \"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| format!("no IPAddress in inspect:\n{}", inspect.stdout))?
            .to_owned();
        let client = rootfs_serving("unused")?;
        let script = format!(
            "for i in $(seq 30); do timeout 10 wget -q -O - http://{ip}/ && exit 0; sleep 1; done; exit 1"
        );
        let out = bulkhead(&[
            "run",
            "--rm",
            "--rootfs",
            client.path().to_str().ok_or("path")?,
            "--",
            "sh",
            "-c",
            &script,
        ])?;
        expect_ok(&out, "wget from the second container")?;
        if !out.stdout.contains("from the first container") {
            return Err(format!("unexpected answer: {:?}", out.stdout).into());
        }
        Ok(())
    })();
    let removed = bulkhead(&["rm", "-f", server])?;
    result?;
    expect_ok(&removed, "rm -f")?;
    network_left_nothing()
}

fn bad_network_flags_leave_nothing() -> Result<(), Failed> {
    let rootfs = rootfs_serving("unused")?;
    let path = rootfs.path().to_str().ok_or("path")?;
    for (flags, says) in [
        (&["-p", "80"][..], "host port"),
        (&["-p", "8080:80/sctp"][..], "sctp"),
        (&["--network", "nosuchnet"][..], "nosuchnet"),
        (
            &["--network", "none", "-p", "8080:80"][..],
            "--network none",
        ),
    ] {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--rootfs", path, "--", "true"]);
        let out = bulkhead(&args)?;
        if out.code != 125 || !out.stderr.contains(says) {
            return Err(format!(
                "{flags:?}: expected exit 125 naming {says:?}, got {}: {}",
                out.code, out.stderr
            )
            .into());
        }
    }
    // A port already taken on the host: refused, nothing half set up.
    let _holder = std::net::TcpListener::bind("127.0.0.1:18083")?;
    let out = bulkhead(&[
        "run",
        "--rm",
        "-p",
        "127.0.0.1:18083:80",
        "--rootfs",
        path,
        "--",
        "true",
    ])?;
    if out.code != 125 || !out.stderr.contains("18083") {
        return Err(format!(
            "a taken host port: expected exit 125 naming it, got {}: {}",
            out.code, out.stderr
        )
        .into());
    }
    network_left_nothing()
}

fn containers_on_a_user_network_find_each_other_by_name() -> Result<(), Failed> {
    let net = "testnet";
    expect_ok(&bulkhead(&["network", "create", net])?, "network create")?;
    let again = bulkhead(&["network", "create", net])?;
    if again.code == 0 || !again.stderr.contains("already exists") {
        return Err(format!("a second create: {} {}", again.code, again.stderr).into());
    }
    let ls = bulkhead(&["network", "ls"])?;
    expect_ok(&ls, "network ls")?;
    if !ls
        .stdout
        .lines()
        .any(|l| l.starts_with(net) && l.contains("10.78."))
    {
        return Err(format!(
            "network ls does not show {net} on 10.78.N.0/24:\n{}",
            ls.stdout
        )
        .into());
    }
    let rootfs = rootfs_serving("found by name")?;
    let path = rootfs.path().to_str().ok_or("path")?;
    let server = "named-server";
    let out = bulkhead(&[
        "run",
        "-d",
        "--name",
        server,
        "--network",
        net,
        "--rootfs",
        path,
        "--",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])?;
    expect_ok(&out, "run -d on the user network")?;
    let result = (|| -> Result<(), Failed> {
        // The network's own rules, made once for all its containers.
        let saved = iptables_save()?;
        for role in ["masquerade", "out", "in"] {
            if !saved.contains(&format!("\"bulkhead:{net}:{role}\"")) {
                return Err(format!("no bulkhead:{net}:{role} rule in iptables:\n{saved}").into());
            }
        }
        let busy = bulkhead(&["network", "rm", net])?;
        if busy.code == 0 || !busy.stderr.contains(server) {
            return Err(format!(
                "network rm with a container on it: {} {}",
                busy.code, busy.stderr
            )
            .into());
        }
        let client = rootfs_serving("unused")?;
        let script = format!(
            "for i in $(seq 30); do timeout 10 wget -q -O - http://{server}/ && exit 0; sleep 1; done; \
             cat /etc/hosts; exit 1"
        );
        let out = bulkhead(&[
            "run",
            "--rm",
            "--network",
            net,
            "--rootfs",
            client.path().to_str().ok_or("path")?,
            "--",
            "sh",
            "-c",
            &script,
        ])?;
        expect_ok(&out, "wget by name")?;
        if !out.stdout.contains("found by name") {
            return Err(format!("unexpected answer: {:?}", out.stdout).into());
        }
        Ok(())
    })();
    let removed = bulkhead(&["rm", "-f", server])?;
    result?;
    expect_ok(&removed, "rm -f")?;
    expect_ok(&bulkhead(&["network", "rm", net])?, "network rm")?;
    let saved = iptables_save()?;
    if saved.contains(&format!("bulkhead:{net}:")) {
        return Err(format!("rules of {net} left after network rm:\n{saved}").into());
    }
    let bridges: Vec<String> = common::listing(Path::new("/sys/class/net"))
        .into_iter()
        .filter(|n| n.starts_with("bh-"))
        .collect();
    if !bridges.is_empty() {
        return Err(format!("bridges left after network rm: {bridges:?}").into());
    }
    common::nothing_left(&["bulkhead-vmm", "virtiofsd"])
}

/// `--egress deny` blocks what the container opens, `allow=` admits exactly
/// what it lists (and only that port), a published port still answers under
/// a policy, and a malformed policy is refused.
fn egress_policy_is_enforced_on_the_host() -> Result<(), Failed> {
    let served = tempfile::tempdir()?;
    std::fs::write(served.path().join("hello.txt"), "hello from the host\n")?;
    let _server = HostServer::start(served.path(), 18085)?;
    let rootfs = rootfs_serving("unused")?;
    let path = rootfs.path().to_str().ok_or("path")?;
    let fetch = format!("timeout 15 wget -q -O - http://{GATEWAY}:18085/hello.txt; echo \"rc=$?\"");
    let run_with = |policy: &str| -> Result<Out, Failed> {
        bulkhead(&[
            "run", "--rm", "--egress", policy, "--rootfs", path, "--", "sh", "-c", &fetch,
        ])
    };
    let denied = run_with("deny")?;
    expect_ok(&denied, "--egress deny")?;
    if denied.stdout.contains("hello from the host") || denied.stdout.contains("rc=0") {
        return Err(format!("--egress deny let the fetch through:\n{}", denied.stdout).into());
    }
    let allowed = run_with(&format!("allow={GATEWAY}/32:18085"))?;
    expect_ok(&allowed, "--egress allow")?;
    if !allowed.stdout.contains("hello from the host") {
        return Err(format!(
            "--egress allow= blocked what it lists:\n{}\n{}",
            allowed.stdout, allowed.stderr
        )
        .into());
    }
    let other_port = run_with(&format!("allow={GATEWAY}/32:18086"))?;
    if other_port.stdout.contains("hello from the host") {
        return Err(format!(
            "--egress allow= of another port let the fetch through:\n{}",
            other_port.stdout
        )
        .into());
    }
    // A policy limits what the container opens, not what it serves.
    let served = rootfs_serving("served under a policy")?;
    let out = bulkhead(&[
        "run",
        "-d",
        "--name",
        "policed-server",
        "--egress",
        "deny",
        "-p",
        "127.0.0.1:18087:80",
        "--rootfs",
        served.path().to_str().ok_or("path")?,
        "--",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])?;
    expect_ok(&out, "run -d --egress deny -p")?;
    let fetched = fetch_local(18087);
    let removed = bulkhead(&["rm", "-f", "policed-server"])?;
    let body = fetched.map_err(|e| format!("a published port under --egress deny: {e:?}"))?;
    if !body.contains("served under a policy") {
        return Err(format!("unexpected answer under a policy: {body:?}").into());
    }
    expect_ok(&removed, "rm -f")?;
    let bad = bulkhead(&[
        "run",
        "--rm",
        "--egress",
        "allow=nowhere",
        "--rootfs",
        path,
        "--",
        "true",
    ])?;
    if bad.code != 125 || !bad.stderr.contains("nowhere") {
        return Err(format!("a bad policy: exit {}: {}", bad.code, bad.stderr).into());
    }
    network_left_nothing()
}
