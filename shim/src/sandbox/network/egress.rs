//! Egress policy: what a sandbox may reach, enforced on the host side, in
//! the sandbox's network namespace, where nothing in the guest can touch it.
//!
//! The default plumbing (tc redirects between the tap and CNI's interface)
//! skips netfilter entirely, which is why it is fast. A sandbox with a
//! policy is plumbed through a bridge instead (tap and interface as its two
//! ports), so that its frames pass nftables' bridge `forward` hook: the
//! guest may only send to the destinations the policy lists.
//!
//! The rules accept `ct state established,related`, so replies to
//! connections made *to* the container (a published port) pass: the
//! bridge's connection tracking (`nf_conntrack_bridge`) saw them come in.
//!
//! Rules are loaded with `nft -f -`: nftables' netlink messages are the nft
//! tool's private business (libnftables is its API), and every Rust crate
//! for it drives that same binary.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::str::FromStr;

use bulkhead_protocol::network::Cidr;
use serde::{Deserialize, Serialize};

/// The nftables table bulkhead owns in a sandbox's namespace.
pub const TABLE: &str = "bulkhead_egress";

/// What a sandbox may connect to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EgressPolicy {
    /// Anything (no filtering, the fast path).
    #[default]
    Open,
    /// Only these destinations; `Allow(vec![])` is "deny".
    Allow(Vec<EgressRule>),
}

/// One allowed destination: a network, and optionally one port (TCP and UDP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRule {
    /// The network.
    pub to: String,
    /// The port, or any.
    pub port: Option<u16>,
}

impl EgressPolicy {
    /// Whether the sandbox needs the filtered (bridged) plumbing.
    pub fn is_filtered(&self) -> bool {
        matches!(self, EgressPolicy::Allow(_))
    }
}

impl FromStr for EgressPolicy {
    type Err = String;

    /// `open`, `deny`, or `allow=CIDR[:PORT],...` (`allow=` may repeat the
    /// entries of a list; an address without a prefix is one host).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "use --egress deny, or --egress allow=CIDR[:PORT],... (e.g. allow=10.0.0.0/8,192.0.2.7:443)";
        match s {
            "open" => return Ok(EgressPolicy::Open),
            "deny" => return Ok(EgressPolicy::Allow(Vec::new())),
            _ => {}
        }
        let Some(list) = s.strip_prefix("allow=") else {
            return Err(format!("--egress {s}: {usage}"));
        };
        let mut rules = Vec::new();
        for entry in list.split(',').filter(|e| !e.is_empty()) {
            rules.push(
                parse_rule(entry)
                    .map_err(|why| format!("--egress {s}: {entry:?} {why}; {usage}"))?,
            );
        }
        if rules.is_empty() {
            return Err(format!(
                "--egress {s}: allow= lists no destination; {usage}"
            ));
        }
        Ok(EgressPolicy::Allow(rules))
    }
}

fn parse_rule(entry: &str) -> Result<EgressRule, String> {
    // `[v6]:port`, `v4/len:port`, `v4:port`, or just the network.
    let (net, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (net, after) = rest.split_once(']').ok_or("has an unclosed '['")?;
        (net.to_owned(), after.strip_prefix(':'))
    } else if entry.matches(':').count() == 1 {
        let (net, port) = entry.split_once(':').unwrap_or_default();
        (net.to_owned(), Some(port))
    } else {
        (entry.to_owned(), None)
    };
    let cidr = if net.contains('/') {
        net.parse::<Cidr>().map_err(|e| e.to_string())?
    } else {
        let addr: IpAddr = net
            .parse()
            .map_err(|_| "is not an IP address or network".to_owned())?;
        Cidr {
            addr,
            prefix: if addr.is_ipv4() { 32 } else { 128 },
        }
    };
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or("has an invalid port")?,
        ),
        None => None,
    };
    Ok(EgressRule {
        to: cidr.to_string(),
        port,
    })
}

/// The ruleset for a sandbox whose tap is `tap`: frames the guest sends are
/// checked in the bridge's forward hook; everything else passes.
pub fn ruleset(policy: &[EgressRule], tap: &str) -> String {
    let mut allow = String::new();
    for rule in policy {
        let family = if rule.to.contains(':') { "ip6" } else { "ip" };
        match rule.port {
            Some(port) => {
                let _ = writeln!(
                    allow,
                    "    {family} daddr {} tcp dport {port} accept",
                    rule.to
                );
                let _ = writeln!(
                    allow,
                    "    {family} daddr {} udp dport {port} accept",
                    rule.to
                );
            }
            None => {
                let _ = writeln!(allow, "    {family} daddr {} accept", rule.to);
            }
        }
    }
    format!(
        "table bridge {TABLE}\n\
         delete table bridge {TABLE}\n\
         table bridge {TABLE} {{\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority 0; policy accept;\n\
         \x20   iifname \"{tap}\" jump from_guest\n\
         \x20 }}\n\
         \x20 chain from_guest {{\n\
         \x20   ct state established,related accept\n\
         \x20   ct state invalid drop\n\
         \x20   ether type arp accept\n\
         \x20   icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept\n\
         {allow}\
         \x20   counter drop\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Loads the policy's ruleset into the calling thread's network namespace
/// (`nft` forks from this thread, so it runs there).
pub fn apply(rules: &[EgressRule], tap: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("running nft for the egress policy (apt-get install nftables): {e}"),
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset(rules, tap).as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // `ct` in the bridge family needs nf_conntrack_bridge; without it
        // the kernel answers EPROTO.
        let hint = if stderr.contains("ct state") && stderr.contains("Protocol error") {
            " (the kernel lacks connection tracking for bridges: modprobe nf_conntrack_bridge)"
        } else {
            ""
        };
        return Err(std::io::Error::other(format!(
            "nft refused the egress policy ({}): {}{hint}",
            out.status,
            stderr.trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse() {
        assert_eq!("open".parse::<EgressPolicy>().unwrap(), EgressPolicy::Open);
        assert_eq!(
            "deny".parse::<EgressPolicy>().unwrap(),
            EgressPolicy::Allow(vec![])
        );
        let p: EgressPolicy = "allow=10.0.0.0/8,192.0.2.7:443,[fd00::1]:53"
            .parse()
            .unwrap();
        assert_eq!(
            p,
            EgressPolicy::Allow(vec![
                EgressRule {
                    to: "10.0.0.0/8".into(),
                    port: None
                },
                EgressRule {
                    to: "192.0.2.7/32".into(),
                    port: Some(443)
                },
                EgressRule {
                    to: "fd00::1/128".into(),
                    port: Some(53)
                },
            ])
        );
        for bad in [
            "",
            "allow",
            "allow=",
            "allow=nope",
            "allow=10.0.0.0/33",
            "allow=1.2.3.4:0",
            "block",
        ] {
            let err = bad.parse::<EgressPolicy>().unwrap_err();
            assert!(err.contains("--egress"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_ruleset_checks_only_the_guests_frames() {
        let text = ruleset(
            &[EgressRule {
                to: "10.77.0.1/32".into(),
                port: Some(80),
            }],
            "tap0_bh",
        );
        assert!(
            text.contains("iifname \"tap0_bh\" jump from_guest"),
            "{text}"
        );
        assert!(
            text.contains("ip daddr 10.77.0.1/32 tcp dport 80 accept"),
            "{text}"
        );
        assert!(text.contains("ct state established,related accept"));
        assert!(text.trim_end().ends_with('}'));
        let deny = ruleset(&[], "tap0_bh");
        assert!(
            !deny.contains("daddr") && deny.contains("counter drop"),
            "{deny}"
        );
    }
}
