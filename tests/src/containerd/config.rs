//! containerd's config file and the CNI config of a private containerd.
//!
//! Kept apart from the daemon's lifecycle: it is plain text generation, checked by
//! unit tests without a daemon.

use std::path::Path;

use super::{ContainerdOptions, Layout, OptionValue, RUNC_RUNTIME_TYPE};

/// The plugins turned off: snapshotters this machine lacks (they only log errors
/// and slow start-up) and tracing. (The legacy `io.containerd.runtime.v1.linux`
/// must stay: containerd 1.6's tasks service, hence CRI, refuses to load without it.)
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
];

/// The CNI config of the CRI plugin (and of `ctr run --cni`): a bridge on the
/// emulated host, so pods get real addresses and reach each other and the
/// host, as on a Kubernetes node. The leases live in host-local's default
/// place, shared by every containerd the tests start at once (one bridge,
/// one address pool); `loopback` then brings `lo` up and passes the result on.
pub const CNI_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "bulkhead-test",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "bhtest0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [ [ { "subnet": "10.99.0.0/16" } ] ],
        "routes": [ { "dst": "0.0.0.0/0" } ]
      }
    },
    { "type": "loopback" }
  ]
}
"#;

/// The gateway of [`CNI_CONFLIST`]'s bridge: the host's address on it.
pub const CNI_GATEWAY: &str = "10.99.0.1";

/// containerd's config (version 2) for `opts` laid out as `l`.
pub(super) fn config_toml(opts: &ContainerdOptions, l: &Layout) -> String {
    let mut disabled: Vec<&str> = DISABLED_PLUGINS.to_vec();
    if !opts.cri {
        disabled.push("io.containerd.grpc.v1.cri");
    }
    let list = |items: &[&str]| {
        let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
        format!("[{}]", quoted.join(", "))
    };
    let mut t = String::new();
    let mut line = |s: String| {
        t.push_str(&s);
        t.push('\n');
    };
    line("# Written by bulkhead-tests for a private containerd; see containerd.rs.".into());
    line("version = 2".into());
    line(format!("root = {}", toml_path(&l.root)));
    line(format!("state = {}", toml_path(&l.state)));
    line(format!("disabled_plugins = {}", list(&disabled)));
    line(String::new());
    line("[grpc]".into());
    line(format!("  address = {}", toml_path(&l.socket)));
    line("[debug]".into());
    line(format!("  level = {}", toml_str(&opts.log_level)));
    line("[metrics]".into());
    line("  address = \"\"".into());
    line(String::new());
    // Default /opt/containerd: the opt plugin would create it on the host.
    line("[plugins.\"io.containerd.internal.v1.opt\"]".into());
    line(format!("  path = {}", toml_path(&l.opt)));
    if !opts.cri {
        return t;
    }
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    line(String::new());
    line(format!("[{cri}]"));
    line(format!(
        "  sandbox_image = {}",
        toml_str(&opts.sandbox_image)
    ));
    // Loading the default AppArmor profile would leave it in the host kernel.
    line("  disable_apparmor = true".into());
    // Pods ask for oom_score_adj -998, which needs CAP_SYS_RESOURCE; some test
    // machines (e.g. Firecracker sandboxes) drop it, and runc init then dies with
    // "can't get final child's PID from pipe". Clamp to containerd's own instead.
    line("  restrict_oom_score_adj = true".into());
    // Pod network namespaces under our state dir, not /var/run/netns.
    line("  netns_mounts_under_state_dir = true".into());
    // Port 0: never clash with a system containerd's streaming server.
    line("  stream_server_address = \"127.0.0.1\"".into());
    line("  stream_server_port = \"0\"".into());
    line(format!("[{cri}.cni]"));
    line(format!("  bin_dir = {}", toml_path(&opts.cni_bin_dir)));
    line(format!("  conf_dir = {}", toml_path(&l.cni_conf_dir)));
    line("  max_conf_num = 1".into());
    line(format!("[{cri}.containerd]"));
    line("  snapshotter = \"overlayfs\"".into());
    if let Some(first) = opts.runtimes.first() {
        line(format!(
            "  default_runtime_name = {}",
            toml_str(&first.handler)
        ));
    }
    for rt in &opts.runtimes {
        let table = format!("{cri}.containerd.runtimes.{}", toml_str(&rt.handler));
        line(format!("[{table}]"));
        line(format!("  runtime_type = {}", toml_str(&rt.runtime_type)));
        let pod: Vec<&str> = rt.pod_annotations.iter().map(String::as_str).collect();
        line(format!("  pod_annotations = {}", list(&pod)));
        let ctr: Vec<&str> = rt
            .container_annotations
            .iter()
            .map(String::as_str)
            .collect();
        line(format!("  container_annotations = {}", list(&ctr)));
        let mut options = rt.options.clone();
        if rt.runtime_type == RUNC_RUNTIME_TYPE && !options.iter().any(|(k, _)| k == "Root") {
            let root = l.runc_root.to_string_lossy().into_owned();
            options.push(("Root".into(), OptionValue::Str(root)));
        }
        if options.is_empty() {
            continue;
        }
        line(format!("[{table}.options]"));
        for (key, value) in options {
            let value = match value {
                OptionValue::Str(s) => toml_str(&s),
                OptionValue::Bool(b) => b.to_string(),
                OptionValue::Int(i) => i.to_string(),
            };
            line(format!("  {} = {value}", toml_str(&key)));
        }
    }
    t
}

/// `s` as a TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(path: &Path) -> String {
    toml_str(&path.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containerd::{ContainerdOptions, Runtime};
    use std::path::PathBuf;

    fn layout() -> Layout {
        Layout::new(PathBuf::from("/tmp/bulkhead-containerd-x"))
    }

    #[test]
    fn config_registers_runtimes_and_cri() {
        let opts = ContainerdOptions::new("docker.io/library/pause:test").runtime(
            Runtime::bulkhead()
                .option("ConfigPath", "/a \"b\"")
                .option("Debug", true),
        );
        let t = config_toml(&opts, &layout());
        for expected in [
            "version = 2",
            "root = \"/tmp/bulkhead-containerd-x/root\"",
            "state = \"/tmp/bulkhead-containerd-x/state\"",
            "address = \"/tmp/bulkhead-containerd-x/containerd.sock\"",
            "sandbox_image = \"docker.io/library/pause:test\"",
            "bin_dir = \"/usr/lib/cni\"",
            "conf_dir = \"/tmp/bulkhead-containerd-x/cni/net.d\"",
            "default_runtime_name = \"runc\"",
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.\"runc\"]",
            "runtime_type = \"io.containerd.runc.v2\"",
            "\"Root\" = \"/tmp/bulkhead-containerd-x/state/runc\"",
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.\"bulkhead\"]",
            "runtime_type = \"io.containerd.bulkhead.v2\"",
            "\"ConfigPath\" = \"/a \\\"b\\\"\"",
            "\"Debug\" = true",
            "\"io.containerd.snapshotter.v1.btrfs\"",
            "path = \"/tmp/bulkhead-containerd-x/opt\"",
        ] {
            assert!(t.contains(expected), "missing {expected:?} in:\n{t}");
        }
        let disabled = t
            .lines()
            .find(|l| l.starts_with("disabled_plugins"))
            .unwrap();
        assert!(!disabled.contains("cri"), "CRI disabled: {disabled}");
    }

    #[test]
    fn config_without_cri() {
        let mut opts = ContainerdOptions::new("x");
        opts.cri = false;
        let t = config_toml(&opts, &layout());
        let disabled = t
            .lines()
            .find(|l| l.starts_with("disabled_plugins"))
            .unwrap();
        assert!(disabled.contains("\"io.containerd.grpc.v1.cri\""), "{t}");
        assert!(!t.contains("sandbox_image"), "{t}");
    }

    #[test]
    fn conflist_is_json() {
        let v: serde_json::Value = serde_json::from_str(CNI_CONFLIST).unwrap();
        assert_eq!(v["plugins"][1]["type"], "loopback");
    }

    #[test]
    fn toml_strings() {
        assert_eq!(toml_str("a"), "\"a\"");
        assert_eq!(toml_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
    }
}
