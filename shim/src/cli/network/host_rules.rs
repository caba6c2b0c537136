//! The host firewall rules a bulkhead bridge network needs: masquerading of
//! what leaves the subnet, and forwarding to and from the bridge through a
//! FORWARD policy of DROP (which docker sets). They are made once per
//! network, as docker does for its bridges, not once per container as CNI's
//! `ipMasq` and `firewall` plugin do: those run `iptables` ten-odd times per
//! container start and again at its end, which was most of what the network
//! added to a start (1.5 s of 1.8 s in the emulated host).
//!
//! Every rule carries the comment `bulkhead:NETWORK:ROLE`, by which it is
//! found again: [`NetworkRules::ensure`] adds the ones missing (a firewall
//! reload may have dropped them) and [`remove`] deletes all of a network's.
//! `iptables-save` and `iptables-restore` do it in one process each: there is
//! no netlink crate for nftables rules in iptables' own tables, and these
//! must live there, next to docker's, for an ACCEPT to count in FORWARD.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// A bridge network, as its rules see it.
#[derive(Debug, Clone)]
pub struct NetworkRules {
    /// The network's name, in the rules' comments.
    pub network: String,
    /// The host bridge its containers are on.
    pub bridge: String,
    /// Its IPv4 subnet.
    pub subnet: String,
}

/// One rule: where it goes and what it says, `-j` and comment included.
#[derive(Debug, PartialEq, Eq)]
struct Rule {
    table: &'static str,
    /// `-A CHAIN` or `-I CHAIN 1`.
    position: String,
    tag: String,
    spec: String,
}

impl NetworkRules {
    fn rules(&self) -> Vec<Rule> {
        let rule = |table, position: &str, role: &str, matches: String, target: &str| {
            let tag = tag(&self.network, role);
            Rule {
                table,
                position: position.to_owned(),
                spec: format!("{matches} -m comment --comment \"{tag}\" -j {target}"),
                tag,
            }
        };
        let (bridge, subnet) = (&self.bridge, &self.subnet);
        vec![
            // Leaving the subnet other than back onto the bridge: the
            // host's address. (Traffic between the containers keeps theirs.)
            rule(
                "nat",
                "-A POSTROUTING",
                "masquerade",
                format!("-s {subnet} ! -o {bridge}"),
                "MASQUERADE",
            ),
            // First in FORWARD, before a DROP policy or docker's chains.
            rule(
                "filter",
                "-I FORWARD 1",
                "out",
                format!("-i {bridge}"),
                "ACCEPT",
            ),
            rule(
                "filter",
                "-I FORWARD 1",
                "in",
                format!("-o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED"),
                "ACCEPT",
            ),
        ]
    }

    /// Adds whichever of the network's rules are missing. `lock` is a file
    /// held while checking and adding, so two starts add each rule once.
    pub fn ensure(&self, lock: &Path) -> Result<()> {
        let _held = lock_file(lock)?;
        let saved = iptables_save()?;
        let missing: Vec<Rule> = self
            .rules()
            .into_iter()
            .filter(|r| !has_rule(&saved, r.table, &r.tag))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        tracing::debug!(network = %self.network, count = missing.len(), "adding host firewall rules");
        let lines = missing
            .iter()
            .map(|r| (r.table, format!("{} {}", r.position, r.spec)));
        iptables_restore(&restore_input(lines)).with_context(|| {
            format!(
                "adding the host firewall rules of network {} (masquerade and forward for {})",
                self.network, self.bridge
            )
        })
    }
}

/// Deletes every rule of `network` (all copies, whatever made them).
pub fn remove(network: &str, lock: &Path) -> Result<()> {
    let _held = lock_file(lock)?;
    let saved = iptables_save()?;
    let deletions = deletions(&saved, network);
    if deletions.is_empty() {
        return Ok(());
    }
    iptables_restore(&restore_input(deletions.into_iter()))
        .with_context(|| format!("deleting the host firewall rules of network {network}"))
}

fn tag(network: &str, role: &str) -> String {
    format!("bulkhead:{network}:{role}")
}

/// The `-A CHAIN ...` lines of each table in `iptables-save` output.
fn appended(saved: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut table = "";
    saved.lines().filter_map(move |line| {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
            None
        } else if line.starts_with("-A ") {
            Some((table, line))
        } else {
            None
        }
    })
}

/// The value of a rule line's `--comment`, quoted or not.
fn comment(line: &str) -> Option<&str> {
    let rest = &line[line.find("--comment ")? + "--comment ".len()..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split_whitespace().next(),
    }
}

fn has_rule(saved: &str, table: &str, tag: &str) -> bool {
    appended(saved).any(|(t, line)| t == table && comment(line) == Some(tag))
}

/// `-D` lines for every rule of `network`, by table.
fn deletions(saved: &str, network: &str) -> Vec<(&'static str, String)> {
    let prefix = tag(network, "");
    appended(saved)
        .filter(|(_, line)| comment(line).is_some_and(|c| c.starts_with(&prefix)))
        .filter_map(|(table, line)| {
            let table = ["nat", "filter"].into_iter().find(|t| *t == table)?;
            Some((table, format!("-D {}", &line["-A ".len()..])))
        })
        .collect()
}

/// `iptables-restore` input: each table's lines, then COMMIT.
fn restore_input(lines: impl Iterator<Item = (&'static str, String)>) -> String {
    let mut by_table: Vec<(&str, Vec<String>)> = Vec::new();
    for (table, line) in lines {
        match by_table.iter_mut().find(|(t, _)| *t == table) {
            Some((_, v)) => v.push(line),
            None => by_table.push((table, vec![line])),
        }
    }
    let mut out = String::new();
    for (table, lines) in by_table {
        out.push_str(&format!("*{table}\n"));
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

fn lock_file(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))
}

fn iptables_save() -> Result<String> {
    let out = Command::new("iptables-save")
        .stderr(Stdio::piped())
        .output()
        .context("running iptables-save (apt-get install iptables)")?;
    if !out.status.success() {
        bail!(
            "iptables-save failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn iptables_restore(input: &str) -> Result<()> {
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iptables-restore (apt-get install iptables)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore failed ({}): {}\ninput:\n{input}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::network::netns;

    fn rules() -> NetworkRules {
        NetworkRules {
            network: "web".into(),
            bridge: "bh-1234abcd".into(),
            subnet: "10.78.3.0/24".into(),
        }
    }

    const SAVED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:FORWARD DROP [0:0]
-A FORWARD -o bh-1234abcd -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"bulkhead:web:in\" -j ACCEPT
-A FORWARD -i bh-1234abcd -m comment --comment bulkhead:web:out -j ACCEPT
-A FORWARD -i other -m comment --comment \"bulkhead:webby:out\" -j ACCEPT
-A FORWARD -j DOCKER-USER
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
COMMIT
";

    #[test]
    fn rules_are_found_by_their_comment_in_their_table() {
        assert!(has_rule(SAVED, "filter", "bulkhead:web:in"));
        assert!(has_rule(SAVED, "filter", "bulkhead:web:out"));
        assert!(!has_rule(SAVED, "nat", "bulkhead:web:masquerade"));
        assert!(!has_rule(SAVED, "nat", "bulkhead:web:in"));
        let missing: Vec<String> = rules()
            .rules()
            .into_iter()
            .filter(|r| !has_rule(SAVED, r.table, &r.tag))
            .map(|r| r.tag)
            .collect();
        assert_eq!(missing, ["bulkhead:web:masquerade"]);
    }

    #[test]
    fn removal_deletes_only_that_networks_rules() {
        let d = deletions(SAVED, "web");
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d
            .iter()
            .all(|(t, l)| *t == "filter" && l.starts_with("-D FORWARD ")));
        assert!(!d.iter().any(|(_, l)| l.contains("webby")));
        let input = restore_input(d.into_iter());
        assert!(input.starts_with("*filter\n-D FORWARD -o bh-1234abcd"));
        assert!(input.ends_with("COMMIT\n"));
    }

    /// Against the real iptables, in a namespace of its own.
    #[test]
    fn ensure_adds_each_rule_once_and_remove_deletes_them() {
        if !nix::unistd::geteuid().is_root() || which("iptables-save").is_none() {
            eprintln!("skipped: needs root and iptables");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("ns");
        netns::create(&ns).unwrap();
        let lock = dir.path().join("lock");
        let saved = netns::run_in(&ns, move || {
            let r = rules();
            r.ensure(&lock).map_err(std::io::Error::other)?;
            r.ensure(&lock).map_err(std::io::Error::other)?;
            let after_ensure = iptables_save().map_err(std::io::Error::other)?;
            remove("web", &lock).map_err(std::io::Error::other)?;
            let after_remove = iptables_save().map_err(std::io::Error::other)?;
            Ok((after_ensure, after_remove))
        });
        netns::remove(&ns).unwrap();
        let (after_ensure, after_remove) = saved.unwrap();
        assert_eq!(
            after_ensure.matches("bulkhead:web:").count(),
            3,
            "{after_ensure}"
        );
        assert!(after_ensure.contains(
            "-A POSTROUTING -s 10.78.3.0/24 ! -o bh-1234abcd -m comment --comment \"bulkhead:web:masquerade\" -j MASQUERADE"
        ));
        assert!(!after_remove.contains("bulkhead:web:"), "{after_remove}");
    }

    fn which(name: &str) -> Option<std::path::PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.exists())
        })
    }
}
