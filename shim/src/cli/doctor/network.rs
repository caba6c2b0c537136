//! Whether `bulkhead run`'s default network can be set up here: the tun
//! device (the VM's tap), the CNI plugins the `bulkhead` network runs, and
//! the iptables they call.

use std::path::Path;

use super::Check;
use crate::sandbox::artifacts::on_path;
use crate::sandbox::network::cni::Plugins;

/// The plugins of the default network list.
const PLUGINS: &[&str] = &["bridge", "host-local", "portmap"];

/// The network check.
pub(super) fn check_network() -> Check {
    let plugins = Plugins::system();
    let missing: Vec<&str> = PLUGINS
        .iter()
        .copied()
        .filter(|p| !plugins.dirs.iter().any(|d| d.join(p).is_file()))
        .collect();
    let tun = Path::new("/dev/net/tun").exists();
    let iptables = on_path("iptables");
    network_check(&missing, tun, iptables.is_some())
}

fn network_check(missing_plugins: &[&str], tun: bool, iptables: bool) -> Check {
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    if !missing_plugins.is_empty() {
        problems.push(format!(
            "CNI plugins missing from /usr/lib/cni and /opt/cni/bin: {}",
            missing_plugins.join(", ")
        ));
        fixes.push("apt-get install containernetworking-plugins");
    }
    if !iptables {
        problems.push(
            "no iptables on PATH (the portmap plugin and the networks' host rules use it)".into(),
        );
        fixes.push("apt-get install iptables");
    }
    if !tun {
        problems.push("no /dev/net/tun (the microVM's tap)".into());
        fixes.push("modprobe tun");
    }
    if problems.is_empty() {
        return Check::ok(
            "network",
            "CNI plugins (bridge, host-local, portmap), iptables and /dev/net/tun",
        );
    }
    Check::fail(
        "network",
        format!(
            "{}; `bulkhead run` needs them unless given --network none",
            problems.join("; ")
        ),
        Some(fixes.join(", then ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_missing_is_named_with_its_fix() {
        let c = network_check(&[], true, true);
        assert!(c.fix.is_none(), "{c:?}");
        let c = network_check(&["portmap"], true, false);
        assert!(
            c.detail.contains("portmap") && c.detail.contains("iptables"),
            "{c:?}"
        );
        let fix = c.fix.unwrap_or_default();
        assert!(
            fix.contains("containernetworking-plugins") && fix.contains("apt-get install iptables")
        );
        let c = network_check(&[], false, true);
        assert!(c.fix.unwrap_or_default().contains("modprobe tun"));
    }
}
