//! `bulkhead run`'s networking, the way docker and nerdctl do it: each
//! container gets a network namespace of its own on the host, the standard
//! CNI plugins (bridge, host-local, portmap) put an interface in it, and the
//! sandbox core joins the VM's tap to that interface. Masquerading and
//! forwarding are rules each network makes once on the host ([`host_rules`]).
//!
//! What was set up is written down (`network.json` in the container's
//! directory) before anything is made, so that the monitor's end, `rm` and a
//! later `bulkhead` run after a crash can all take it down again.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::containers::{ContainerRecord, Containers};
use crate::config::Config;
use crate::sandbox::network::cni::{self, Attachment, Plugins, PortMapping};
use crate::sandbox::network::egress::EgressPolicy;
use crate::sandbox::network::{self as core, netns, NetworkAttachment};

pub mod host_rules;

use host_rules::NetworkRules;

/// The network a container is on when `--network` is not given.
pub const DEFAULT_NETWORK: &str = "bulkhead";
/// The default network's bridge on the host.
pub const DEFAULT_BRIDGE: &str = "bulkhead0";
/// The default network's addresses: private, and clear of docker's
/// (172.17/16), podman's (10.88/16, 10.89/16) and nerdctl's (10.4/24).
pub const DEFAULT_SUBNET: &str = "10.77.0.0/16";
/// The interface CNI makes in the container's namespace.
pub const IFNAME: &str = "eth0";
/// Name of the record of a container's attachment, in its directory.
pub const ATTACHMENT_FILE: &str = "network.json";

/// `--network`: none, or a network by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Only `lo` in the guest.
    None,
    /// A CNI network list.
    Named(String),
}

impl Default for NetworkMode {
    fn default() -> Self {
        NetworkMode::Named(DEFAULT_NETWORK.to_owned())
    }
}

impl std::str::FromStr for NetworkMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(NetworkMode::None),
            "" => bail!(
                "--network needs a value: none, or a network name (default: {DEFAULT_NETWORK})"
            ),
            "host" => bail!(
                "--network host: a container in a microVM cannot share the host's network stack; \
                 publish ports with -p instead"
            ),
            name if name.starts_with("container:") => {
                bail!("--network {name}: joining another container's network is not supported yet")
            }
            name => {
                bulkhead_protocol::validate_id(name).map_err(|e| {
                    anyhow::anyhow!("--network {name:?}: invalid network name: {e}")
                })?;
                Ok(NetworkMode::Named(name.to_owned()))
            }
        }
    }
}

/// Parses `-p [IP:]HOST:CTR[/tcp|udp]`, docker's form.
pub fn parse_publish(spec: &str) -> Result<PortMapping> {
    let usage = "use -p [IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp], e.g. -p 8080:80";
    let (ports, protocol) = match spec.rsplit_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some((_, other)) => bail!("-p {spec}: unknown protocol {other:?} (tcp or udp); {usage}"),
        None => (spec, "tcp"),
    };
    // An IPv6 host address comes in brackets: [::1]:8080:80.
    let (host_ip, rest) = if let Some(rest) = ports.strip_prefix('[') {
        let (ip, rest) = rest
            .split_once("]:")
            .with_context(|| format!("-p {spec}: unclosed '[' around the address; {usage}"))?;
        (ip.to_owned(), rest)
    } else {
        match ports.matches(':').count() {
            1 => (String::new(), ports),
            2 => {
                let (ip, rest) = ports.split_once(':').unwrap_or_default();
                (ip.to_owned(), rest)
            }
            0 => bail!("-p {spec}: a host port is needed (bulkhead does not pick one); {usage}"),
            _ => bail!("-p {spec}: {usage}"),
        }
    };
    if !host_ip.is_empty() {
        host_ip
            .parse::<IpAddr>()
            .map_err(|_| anyhow::anyhow!("-p {spec}: {host_ip:?} is not an IP address; {usage}"))?;
    }
    let (host, container) = rest
        .split_once(':')
        .with_context(|| format!("-p {spec}: a host port is needed; {usage}"))?;
    let port = |p: &str, what: &str| -> Result<u16> {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("-p {spec}: {what} port {p:?} is not a port number (1-65535); {usage}"),
        }
    };
    Ok(PortMapping {
        host_port: port(host, "host")?,
        container_port: port(container, "container")?,
        protocol: protocol.to_owned(),
        host_ip,
    })
}

/// Parses `--add-host NAME:IP`.
pub fn parse_add_host(spec: &str) -> Result<(String, IpAddr)> {
    let (name, ip) = spec
        .split_once(':')
        .with_context(|| format!("--add-host {spec}: use NAME:IP, e.g. --add-host db:10.0.0.5"))?;
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| anyhow::anyhow!("--add-host {spec}: {ip:?} is not an IP address"))?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        bail!("--add-host {spec}: {name:?} is not a host name");
    }
    Ok((name.to_owned(), ip))
}

/// A container's network settings, as `bulkhead run` was given them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOptions {
    /// `--network`.
    #[serde(default)]
    pub mode: NetworkMode,
    /// `-p`.
    #[serde(default)]
    pub publish: Vec<PortMapping>,
    /// `--dns`.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// `--add-host`.
    #[serde(default)]
    pub extra_hosts: Vec<(String, IpAddr)>,
    /// `--egress`, or the config's `egress`.
    #[serde(default)]
    pub egress: EgressPolicy,
}

impl NetworkOptions {
    /// Refuses combinations that cannot work, before anything is made.
    pub fn validate(&self) -> Result<()> {
        if self.mode == NetworkMode::None && !self.publish.is_empty() {
            bail!("-p with --network none: a container without a network has no port to publish");
        }
        if self.mode == NetworkMode::None && self.egress.is_filtered() {
            bail!("--egress with --network none: a container without a network has no egress to limit");
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.publish {
            if !seen.insert((p.host_ip.clone(), p.host_port, p.protocol.clone())) {
                bail!(
                    "-p: host port {}/{} is published twice",
                    p.host_port,
                    p.protocol
                );
            }
        }
        Ok(())
    }
}

/// The network lists' directory, under the state root.
fn networks_dir(config: &Config) -> PathBuf {
    super::state_root(config).join("networks")
}

/// Held while the host firewall rules of any network are checked or changed.
fn rules_lock(config: &Config) -> PathBuf {
    networks_dir(config).join(".host-rules.lock")
}

/// The network list of `name`. The default network's is the one this
/// version makes, written on first use and rewritten when an older version
/// left another (the records of running containers keep the list they were
/// connected with, so their teardown is unchanged).
pub fn conflist(config: &Config, name: &str) -> Result<serde_json::Value> {
    let path = networks_dir(config).join(format!("{name}.conflist"));
    if name == DEFAULT_NETWORK {
        let list = bridge_conflist(config, name, DEFAULT_BRIDGE, DEFAULT_SUBNET);
        let text = serde_json::to_vec_pretty(&list)?;
        if std::fs::read(&path).ok().as_deref() != Some(&text[..]) {
            std::fs::create_dir_all(networks_dir(config))
                .with_context(|| format!("creating {}", networks_dir(config).display()))?;
            std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(list);
    }
    let text = std::fs::read(&path).map_err(|_| {
        anyhow::anyhow!(
            "no network named {name:?}: use --network {DEFAULT_NETWORK}, or --network none"
        )
    })?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a CNI network list", path.display()))
}

/// A bridge network list: the bridge is the gateway, leases are kept under
/// the state root (so `system prune` can find them) and ports are published
/// with portmap. Masquerading and forwarding are the network's host rules
/// ([`host_rules`]), made once for all its containers, not CNI's `ipMasq`
/// and `firewall` plugin, which change iptables at every start and stop.
pub fn bridge_conflist(
    config: &Config,
    name: &str,
    bridge: &str,
    subnet: &str,
) -> serde_json::Value {
    json!({
        "cniVersion": cni::CNI_VERSION,
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": super::state_root(config).join("cni").join("ipam"),
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

/// The host rules a network list needs, if it is a bridge network.
fn host_rules_of(name: &str, list: &serde_json::Value) -> Option<NetworkRules> {
    let (bridge, subnet) = summary(list);
    (list["plugins"][0]["type"] == "bridge" && !bridge.is_empty() && !subnet.is_empty()).then(
        || NetworkRules {
            network: name.to_owned(),
            bridge,
            subnet,
        },
    )
}

/// What `network ls` and `inspect` show of a network list.
fn summary(list: &serde_json::Value) -> (String, String) {
    let bridge = list["plugins"][0]["bridge"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let subnet = list["plugins"][0]["ipam"]["ranges"][0][0]["subnet"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (bridge, subnet)
}

/// Every network's name and list, the default one included (made if missing).
fn all_networks(config: &Config) -> Result<Vec<(String, serde_json::Value)>> {
    conflist(config, DEFAULT_NETWORK)?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(networks_dir(config))? {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".conflist"))
        else {
            continue;
        };
        out.push((name.to_owned(), conflist(config, name)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Whether two IPv4 networks overlap.
fn overlaps(a: &str, b: &str) -> bool {
    use bulkhead_protocol::network::Cidr;
    match (a.parse::<Cidr>(), b.parse::<Cidr>()) {
        (Ok(a), Ok(b)) => a.overlaps(&b),
        _ => false,
    }
}

/// `bulkhead network create NAME [--subnet CIDR]`: a bridge network list of
/// the same shape as the default one, on its own bridge and subnet.
pub fn create(config: &Config, name: &str, subnet: Option<&str>) -> Result<()> {
    let NetworkMode::Named(name) = name.parse::<NetworkMode>()? else {
        bail!("\"none\" is not a network that can be created");
    };
    let existing = all_networks(config)?;
    if existing.iter().any(|(n, _)| *n == name) {
        bail!("network {name} already exists");
    }
    let taken: Vec<String> = existing.iter().map(|(_, l)| summary(l).1).collect();
    let subnet = match subnet {
        Some(s) => {
            let cidr: bulkhead_protocol::network::Cidr = s
                .parse()
                .map_err(|e| anyhow::anyhow!("--subnet {s}: {e}, e.g. --subnet 10.79.0.0/24"))?;
            if !cidr.addr.is_ipv4() || cidr.prefix > 30 {
                bail!("--subnet {s}: an IPv4 network of at least 4 addresses (a /30 or larger)");
            }
            if let Some(t) = taken.iter().find(|t| overlaps(t, s)) {
                bail!("--subnet {s} overlaps {t}, which another network uses");
            }
            s.to_owned()
        }
        None => (0..=255)
            .map(|n| format!("10.78.{n}.0/24"))
            .find(|c| !taken.iter().any(|t| overlaps(t, c)))
            .context("no free 10.78.N.0/24 left: give --subnet")?,
    };
    // Linux names are at most 15 bytes: a short hash of the name.
    let bridge = format!("bh-{:08x}", crc32(name.as_bytes()));
    let list = bridge_conflist(config, &name, &bridge, &subnet);
    let path = networks_dir(config).join(format!("{name}.conflist"));
    std::fs::write(&path, serde_json::to_vec_pretty(&list)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{name}");
    Ok(())
}

/// A small, stable hash for bridge names (not for security).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The containers with a network up on `name` (running, or whose network
/// was not taken down yet).
fn attached_to(containers: &Containers, name: &str) -> Result<Vec<ContainerRecord>> {
    Ok(containers
        .ids()?
        .into_iter()
        .filter(|id| containers.dir(id).join(ATTACHMENT_FILE).exists())
        .filter_map(|id| containers.record(&id).ok())
        .filter(|r| r.network.mode == NetworkMode::Named(name.to_owned()))
        .collect())
}

/// `bulkhead network ls`.
pub fn list(config: &Config, quiet: bool) -> Result<()> {
    let networks = all_networks(config)?;
    if quiet {
        for (name, _) in networks {
            println!("{name}");
        }
        return Ok(());
    }
    println!(
        "{:<24} {:<18} {:<16} CONTAINERS",
        "NAME", "SUBNET", "BRIDGE"
    );
    let containers = super::manage::containers(config)?;
    for (name, list) in networks {
        let (bridge, subnet) = summary(&list);
        let n = attached_to(&containers, &name)?.len();
        println!("{name:<24} {subnet:<18} {bridge:<16} {n}");
    }
    Ok(())
}

/// `bulkhead network inspect NAME...`.
pub fn inspect(config: &Config, names: &[String]) -> Result<()> {
    let store = super::manage::containers(config)?;
    let mut out = Vec::new();
    for name in names {
        let list = conflist(config, name)?;
        let (bridge, subnet) = summary(&list);
        let containers: Vec<serde_json::Value> = attached_to(&store, name)?
            .iter()
            .map(|r| json!({"Id": r.id, "Name": r.name, "Addresses": addresses(&store.dir(&r.id))}))
            .collect();
        out.push(json!({
            "Name": name,
            "Driver": "bridge",
            "Bridge": bridge,
            "Subnet": subnet,
            "Containers": containers,
            "CNI": list,
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `bulkhead network rm NAME...`: the list, and the bridge the plugins made.
pub async fn remove(config: &Config, names: &[String]) -> Result<()> {
    let mut failed = Vec::new();
    for name in names {
        let result = async {
            if name == DEFAULT_NETWORK {
                bail!("{DEFAULT_NETWORK} is the default network and cannot be removed");
            }
            let list = conflist(config, name)?;
            let users = attached_to(&super::manage::containers(config)?, name)?;
            if !users.is_empty() {
                let names: Vec<&str> = users.iter().map(|r| r.name.as_str()).collect();
                bail!(
                    "network {name} has containers on it: {} (stop or rm them first)",
                    names.join(", ")
                );
            }
            let path = networks_dir(config).join(format!("{name}.conflist"));
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            let (bridge, _) = summary(&list);
            delete_link(&bridge).await?;
            host_rules::remove(name, &rules_lock(config))?;
            let leases = super::state_root(config)
                .join("cni")
                .join("ipam")
                .join(name);
            let _ = std::fs::remove_dir_all(leases);
            Ok(())
        }
        .await;
        match result {
            Ok(()) => println!("{name}"),
            Err(e) => {
                eprintln!("bulkhead: {e:#}");
                failed.push(name.as_str());
            }
        }
    }
    if !failed.is_empty() {
        bail!("not removed: {}", failed.join(", "));
    }
    Ok(())
}

/// Deletes host interface `name` if it exists.
async fn delete_link(name: &str) -> Result<()> {
    use futures_util::TryStreamExt;
    if name.is_empty() {
        return Ok(());
    }
    let handle = crate::sandbox::network::plumbing::connect()?;
    let found = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await;
    if let Ok(Some(link)) = found {
        handle
            .link()
            .del(link.header.index)
            .execute()
            .await
            .with_context(|| format!("deleting bridge {name}"))?;
    }
    Ok(())
}

/// Rewrites `/etc/hosts` of every container on network `name`, in place
/// (same file, so the guests see it through the share), so that each names
/// all the others: containers on one network find each other by name.
pub fn refresh_hosts(config: &Config, name: &str) {
    let Ok(containers) = super::manage::containers(config) else {
        return;
    };
    let Ok(records) = attached_to(&containers, name) else {
        return;
    };
    let peers: Vec<(String, String, Vec<IpAddr>)> = records
        .iter()
        .map(|r| {
            let ips = addresses(&containers.dir(&r.id))
                .iter()
                .filter_map(|a| a.split('/').next().and_then(|ip| ip.parse().ok()))
                .collect();
            let host = r
                .hostname
                .clone()
                .unwrap_or_else(|| r.short_id().to_owned());
            (r.name.clone(), host, ips)
        })
        .collect();
    for (record, (_, host, ips)) in records.iter().zip(&peers) {
        let mut extra = record.network.extra_hosts.clone();
        for (peer_name, peer_host, peer_ips) in &peers {
            if peer_host == host {
                continue;
            }
            for ip in peer_ips {
                extra.push((format!("{peer_name} {peer_host}"), *ip));
            }
        }
        let text = hosts_file(&format!("{} {host}", record.name), ips, &extra);
        let path = containers.dir(&record.id).join("etc").join("hosts");
        if path.exists() {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
            if let Err(e) = written {
                tracing::warn!("updating {}: {e}", path.display());
            }
        }
    }
}

/// Where a container's network namespace is pinned.
fn netns_path(config: &Config, sid: &str) -> PathBuf {
    config.run_root.join("netns").join(sid)
}

/// A container's network, half made: the namespace, the VM's tap in it and
/// the published ports held, with CNI still to run ([`Pending::connect`]),
/// which takes seconds and so runs while the VM starts.
pub struct Pending {
    /// The tap (not joined yet) for the sandbox core.
    pub attachment: NetworkAttachment,
    /// What CNI ADD is to run.
    pub cni: PendingCni,
    /// The published ports, bound on the host for as long as the container
    /// runs (portmap only rewrites packets): so a second container or a host
    /// program cannot take them too, and a port in use is an error at once.
    pub reserved: Vec<PortReservation>,
}

/// CNI ADD, to run: see [`Pending`].
pub struct PendingCni {
    record: Attachment,
    record_path: PathBuf,
    name: String,
    /// The network's host rules, to be made if missing, and their lock.
    rules: Option<(NetworkRules, PathBuf)>,
}

impl PendingCni {
    /// Makes sure the network's host rules are there, then runs the network
    /// list's ADD and records its result.
    pub async fn connect(mut self) -> Result<Attachment> {
        if let Some((rules, lock)) = self.rules.take() {
            tokio::task::spawn_blocking(move || rules.ensure(&lock))
                .await
                .context("the host rules thread panicked")??;
        }
        cni::add(&Plugins::system(), &mut self.record)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to network {}: {e}", self.name))?;
        cni::save(&self.record_path, &self.record)?;
        Ok(self.record)
    }
}

/// A host port held for a published container port.
#[derive(Debug)]
pub enum PortReservation {
    /// A TCP port, bound but not listening: nothing is ever accepted.
    Tcp(#[allow(dead_code)] std::os::fd::OwnedFd),
    /// A UDP port.
    Udp(#[allow(dead_code)] std::net::UdpSocket),
}

/// Binds a TCP socket at `addr` without listening (std's TcpListener
/// always listens, and a listening socket would take connections).
fn bind_tcp(addr: std::net::SocketAddr) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    Ok(fd)
}

/// Binds every published host port, failing on the first one in use.
fn reserve_ports(publish: &[PortMapping]) -> Result<Vec<PortReservation>> {
    publish
        .iter()
        .map(|p| {
            let ip: IpAddr = if p.host_ip.is_empty() {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            } else {
                p.host_ip.parse().context("-p: host address")?
            };
            let addr = std::net::SocketAddr::new(ip, p.host_port);
            let held = if p.protocol == "udp" {
                std::net::UdpSocket::bind(addr).map(PortReservation::Udp)
            } else {
                bind_tcp(addr).map(PortReservation::Tcp)
            };
            held.map_err(|e| {
                anyhow::anyhow!(
                    "-p {}: host port {}/{} on {} cannot be published: {e}; choose another host port",
                    format_args!("{}:{}", p.host_port, p.container_port),
                    p.host_port,
                    p.protocol,
                    ip
                )
            })
        })
        .collect()
}

/// Makes the namespace and the tap and holds the published ports; CNI is
/// left to [`PendingCni::connect`]. On failure, whatever was made is taken
/// down again and the error says what failed.
pub async fn prepare(
    config: &Config,
    container_dir: &Path,
    sid: &str,
    opts: &NetworkOptions,
) -> Result<Option<Pending>> {
    let NetworkMode::Named(name) = &opts.mode else {
        return Ok(None);
    };
    let list = without_unused_plugins(conflist(config, name)?, !opts.publish.is_empty());
    Plugins::system()
        .check(&list)
        .map_err(anyhow::Error::from)?;
    let reserved = reserve_ports(&opts.publish)?;
    let ns = netns_path(config, sid);
    let record = Attachment {
        container_id: sid.to_owned(),
        netns: ns.clone(),
        ifname: IFNAME.to_owned(),
        conflist: list,
        port_mappings: opts.publish.clone(),
        result: None,
    };
    let record_path = container_dir.join(ATTACHMENT_FILE);
    // Written first: a crash from here on leaves a record to clean up by.
    cni::save(&record_path, &record)?;
    let made = netns::create(&ns)
        .map_err(anyhow::Error::from)
        .and_then(|()| core::prepare(&ns).map_err(anyhow::Error::from));
    match made {
        Ok(attachment) => Ok(Some(Pending {
            attachment,
            cni: PendingCni {
                rules: host_rules_of(name, &record.conflist).map(|r| (r, rules_lock(config))),
                record,
                record_path,
                name: name.clone(),
            },
            reserved,
        })),
        Err(e) => {
            if let Err(undo) = down(container_dir).await {
                tracing::warn!("taking down a half-made network: {undo:#}");
            }
            Err(e)
        }
    }
}

/// The list without the plugins that would do nothing: portmap when no port
/// is published (each plugin is a process to run at start and at stop).
fn without_unused_plugins(mut list: serde_json::Value, ports: bool) -> serde_json::Value {
    if let Some(plugins) = list["plugins"].as_array_mut() {
        plugins.retain(|p| ports || p["capabilities"]["portMappings"].as_bool() != Some(true));
    }
    list
}

/// Takes a container's network down, if it has one recorded: CNI DEL (the
/// lease, the veth, the port mappings, the firewall rules), then the
/// namespace (and the tap in it, if the VMM is gone), then the record.
/// Safe to call again.
pub async fn down(container_dir: &Path) -> Result<()> {
    let record_path = container_dir.join(ATTACHMENT_FILE);
    if !record_path.exists() {
        return Ok(());
    }
    let record = cni::load(&record_path)?;
    let deleted = cni::del(&Plugins::system(), &record).await;
    netns::remove(&record.netns)
        .with_context(|| format!("removing network namespace {}", record.netns.display()))?;
    deleted.map_err(|e| anyhow::anyhow!("disconnecting from the network: {e}"))?;
    std::fs::remove_file(&record_path)
        .with_context(|| format!("removing {}", record_path.display()))?;
    Ok(())
}

/// Takes down the networks of containers whose monitor is gone without
/// having done it (killed, or the host went down): their leases, port
/// mappings and firewall rules would otherwise stay until `rm`. Run before
/// each new container, so a lease is never held by a container that cannot
/// run. A container still being created (no monitor recorded yet) is left
/// alone.
pub async fn release_orphans(containers: &Containers) {
    let Ok(ids) = containers.ids() else {
        return;
    };
    for id in ids {
        let dir = containers.dir(&id);
        if !dir.join(ATTACHMENT_FILE).exists() {
            continue;
        }
        let Ok(state) = containers.state(&id) else {
            continue;
        };
        if state.monitor.is_none() || state.monitor_alive() {
            continue;
        }
        tracing::info!(container = %id, "releasing the network of a container whose monitor is gone");
        if let Err(e) = down(&dir).await {
            tracing::warn!(container = %id, "releasing its network: {e:#}");
        }
    }
}

/// [`down`] from synchronous code (and from inside a runtime): on a thread
/// with a runtime of its own. Failures are printed, not returned: callers
/// are already cleaning up after something else.
pub fn down_blocking(container_dir: &Path) {
    let dir = container_dir.to_owned();
    let done = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(down(&dir)))
    })
    .join();
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("bulkhead: warning: taking the container's network down: {e:#}"),
        Err(_) => eprintln!("bulkhead: warning: the network teardown thread panicked"),
    }
}

/// The addresses a container got, from its record.
pub fn addresses(container_dir: &Path) -> Vec<String> {
    cni::load(&container_dir.join(ATTACHMENT_FILE))
        .ok()
        .and_then(|r| r.result)
        .map(|r| cni::result_addresses(&r))
        .unwrap_or_default()
}

/// `/etc/hosts` for a container: loopback, its own name on its addresses,
/// and `--add-host` entries.
pub fn hosts_file(hostname: &str, addresses: &[IpAddr], extra: &[(String, IpAddr)]) -> String {
    let mut text = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    for (name, ip) in extra {
        text.push_str(&format!("{ip}\t{name}\n"));
    }
    for ip in addresses {
        text.push_str(&format!("{ip}\t{hostname}\n"));
    }
    text
}

/// `/etc/resolv.conf` for a container: `--dns` servers if given, else the
/// host's, without loopback resolvers (the container cannot reach the host's
/// 127.0.0.53); with none left, public resolvers, as docker does.
pub fn resolv_conf(host_resolv: &str, dns: &[IpAddr]) -> String {
    let mut servers: Vec<String> = dns.iter().map(ToString::to_string).collect();
    let mut other = Vec::new();
    for line in host_resolv.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") if dns.is_empty() => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    if !ip.is_loopback() {
                        servers.push(ip.to_string());
                    }
                }
            }
            Some("search" | "options" | "domain") => other.push(line.trim().to_owned()),
            _ => {}
        }
    }
    if servers.is_empty() {
        servers = vec!["8.8.8.8".into(), "8.8.4.4".into()];
    }
    let mut text: String = other.iter().map(|l| format!("{l}\n")).collect();
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs_parse_like_docker() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (
                p.host_port,
                p.container_port,
                p.protocol.as_str(),
                p.host_ip.as_str()
            ),
            (8080, 80, "tcp", "")
        );
        let p = parse_publish("127.0.0.1:5353:53/udp").unwrap();
        assert_eq!(
            (
                p.host_port,
                p.container_port,
                p.protocol.as_str(),
                p.host_ip.as_str()
            ),
            (5353, 53, "udp", "127.0.0.1")
        );
        let p = parse_publish("[::1]:8080:80").unwrap();
        assert_eq!(p.host_ip, "::1");
        for bad in [
            "80",
            "0:80",
            "8080:80/sctp",
            "a:b",
            "1.2.3:8080:80",
            "8080:70000",
            "1:2:3:4",
        ] {
            let err = parse_publish(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("-p"), "{bad}: {err}");
        }
    }

    #[test]
    fn network_modes_refuse_what_cannot_work() {
        assert_eq!("none".parse::<NetworkMode>().unwrap(), NetworkMode::None);
        assert_eq!(
            "mynet".parse::<NetworkMode>().unwrap(),
            NetworkMode::Named("mynet".into())
        );
        assert!("host"
            .parse::<NetworkMode>()
            .unwrap_err()
            .to_string()
            .contains("-p"));
        assert!("../etc".parse::<NetworkMode>().is_err());
        let opts = NetworkOptions {
            mode: NetworkMode::None,
            publish: vec![parse_publish("80:80").unwrap()],
            ..Default::default()
        };
        assert!(opts.validate().is_err());
        let opts = NetworkOptions {
            publish: vec![
                parse_publish("80:80").unwrap(),
                parse_publish("80:81").unwrap(),
            ],
            ..Default::default()
        };
        assert!(opts.validate().unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn resolv_conf_drops_loopback_resolvers() {
        let host = "# generated\nnameserver 127.0.0.53\noptions edns0\nsearch example.com\n";
        let text = resolv_conf(host, &[]);
        assert!(
            !text.contains("127.0.0.53") && text.contains("nameserver 8.8.8.8"),
            "{text}"
        );
        assert!(text.contains("search example.com") && text.contains("options edns0"));
        let text = resolv_conf("nameserver 10.0.0.2\n", &[]);
        assert_eq!(text, "nameserver 10.0.0.2\n");
        let text = resolv_conf("nameserver 10.0.0.2\n", &["1.1.1.1".parse().unwrap()]);
        assert_eq!(text, "nameserver 1.1.1.1\n");
    }

    #[test]
    fn hosts_name_the_container_and_extra_hosts() {
        let text = hosts_file(
            "web",
            &["10.77.0.2".parse().unwrap()],
            &[("db".into(), "10.0.0.5".parse().unwrap())],
        );
        assert!(text.contains("127.0.0.1\tlocalhost\n"));
        assert!(text.contains("10.77.0.2\tweb\n") && text.contains("10.0.0.5\tdb\n"));
    }

    #[test]
    fn portmap_runs_only_with_published_ports() {
        let list = json!({"plugins": [
            {"type": "bridge"},
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "firewall"}
        ]});
        let types = |l: &serde_json::Value| -> Vec<String> {
            l["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["type"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            types(&without_unused_plugins(list.clone(), true)),
            ["bridge", "portmap", "firewall"]
        );
        assert_eq!(
            types(&without_unused_plugins(list, false)),
            ["bridge", "firewall"]
        );
    }

    #[test]
    fn subnets_overlap_or_not() {
        assert!(overlaps("10.78.0.0/24", "10.78.0.128/25"));
        assert!(overlaps("10.0.0.0/8", "10.78.1.0/24"));
        assert!(!overlaps("10.78.0.0/24", "10.78.1.0/24"));
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn add_host_is_checked() {
        assert_eq!(parse_add_host("db:10.0.0.5").unwrap().0, "db");
        assert!(parse_add_host("db").is_err());
        assert!(parse_add_host("db:nope").is_err());
    }
}
