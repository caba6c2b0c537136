//! Running CNI plugins, as a container runtime does for a network list
//! (CNI spec 1.0: ADD in list order, each plugin getting the previous one's
//! result; DEL in reverse order with the cached result).
//!
//! Written here rather than taken from a crate: the Rust CNI crates are for
//! writing plugins, not for running them, and running one is an exec with
//! four environment variables and JSON on stdin.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::NetworkError;

/// The longest a plugin may take: host-local's lock, iptables' lock.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The CNI version we speak; Debian 12's plugins (1.1.1) speak it.
pub const CNI_VERSION: &str = "1.0.0";

/// A published port, as the portmap plugin takes it (`runtimeConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// The host's port.
    pub host_port: u16,
    /// The container's port.
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The host address to bind, empty for all.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// One attachment of a container to a network list, everything a later DEL
/// needs (kept on disk: a crash or a `kill -9` must not lose a lease).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attachment {
    /// The container id CNI knows.
    pub container_id: String,
    /// The namespace the interface is in.
    pub netns: PathBuf,
    /// The interface's name there.
    pub ifname: String,
    /// The network list (a `.conflist`'s JSON).
    pub conflist: Value,
    /// Published ports.
    pub port_mappings: Vec<PortMapping>,
    /// The last plugin's result, once ADD succeeded.
    #[serde(default)]
    pub result: Option<Value>,
}

/// Where the plugins are.
#[derive(Clone, Debug)]
pub struct Plugins {
    /// Directories searched in order (`CNI_PATH`).
    pub dirs: Vec<PathBuf>,
}

impl Plugins {
    /// Debian's `containernetworking-plugins` and the usual upstream place.
    pub fn system() -> Plugins {
        Plugins {
            dirs: vec![PathBuf::from("/usr/lib/cni"), PathBuf::from("/opt/cni/bin")],
        }
    }

    fn find(&self, kind: &str) -> Result<PathBuf, NetworkError> {
        if kind.is_empty() || kind.contains('/') {
            return Err(NetworkError::Cni(format!(
                "invalid CNI plugin type {kind:?} in the network list"
            )));
        }
        self.dirs
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                NetworkError::Cni(format!(
                    "CNI plugin {kind:?} not found in {}: install Debian's containernetworking-plugins \
                     (apt-get install containernetworking-plugins)",
                    self.dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ))
            })
    }

    /// Every plugin the list names, checked before anything runs, so a
    /// missing one fails with nothing half set up.
    pub fn check(&self, conflist: &Value) -> Result<(), NetworkError> {
        for plugin in plugins_of(conflist)? {
            self.find(plugin["type"].as_str().unwrap_or_default())?;
        }
        Ok(())
    }
}

fn plugins_of(conflist: &Value) -> Result<&Vec<Value>, NetworkError> {
    conflist["plugins"]
        .as_array()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| NetworkError::Cni("the network list has no \"plugins\"".into()))
}

/// The configuration one plugin of the list gets on stdin.
fn plugin_config(attachment: &Attachment, plugin: &Value, prev: Option<&Value>) -> Value {
    let mut config = plugin.clone();
    config["name"] = attachment.conflist["name"].clone();
    config["cniVersion"] = attachment.conflist["cniVersion"].clone();
    if let Some(prev) = prev {
        config["prevResult"] = prev.clone();
    }
    let wants_ports = plugin["capabilities"]["portMappings"].as_bool() == Some(true);
    if wants_ports && !attachment.port_mappings.is_empty() {
        config["runtimeConfig"] = json!({ "portMappings": attachment.port_mappings });
    }
    config
}

async fn exec(
    plugins: &Plugins,
    command: &str,
    attachment: &Attachment,
    config: &Value,
) -> Result<Value, NetworkError> {
    let kind = config["type"].as_str().unwrap_or_default();
    let binary = plugins.find(kind)?;
    let cni_path = std::env::join_paths(&plugins.dirs)
        .map_err(|e| NetworkError::Cni(format!("CNI_PATH: {e}")))?;
    let mut child = tokio::process::Command::new(&binary)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &attachment.container_id)
        .env("CNI_NETNS", &attachment.netns)
        .env("CNI_IFNAME", &attachment.ifname)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NetworkError::Io {
            what: format!("running CNI plugin {}", binary.display()),
            cause: source,
        })?;
    let input = serde_json::to_vec(config).unwrap_or_default();
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that exits without reading its config fails below.
        let _ = stdin.write_all(&input).await;
    }
    let output = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            NetworkError::Cni(format!(
                "CNI plugin {kind} ({command}) did not finish within {} s",
                PLUGIN_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|source| NetworkError::Io {
            what: format!("waiting for CNI plugin {kind}"),
            cause: source,
        })?;
    let stdout: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    if !output.status.success() {
        let msg = stdout["msg"].as_str().unwrap_or_default();
        let details = stdout["details"].as_str().unwrap_or_default();
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(NetworkError::Cni(format!(
            "CNI plugin {kind} ({command}) failed ({}): {msg}{}{}",
            output.status,
            if details.is_empty() {
                String::new()
            } else {
                format!(": {details}")
            },
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!("; stderr: {}", stderr.trim())
            },
        )));
    }
    Ok(stdout)
}

/// ADD through the whole list. On failure, what was added is deleted again
/// (DEL of every plugin, as CNI asks plugins to tolerate), so nothing stays.
pub async fn add(plugins: &Plugins, attachment: &mut Attachment) -> Result<(), NetworkError> {
    plugins.check(&attachment.conflist)?;
    let mut prev: Option<Value> = None;
    for plugin in plugins_of(&attachment.conflist)?.clone() {
        let config = plugin_config(attachment, &plugin, prev.as_ref());
        match exec(plugins, "ADD", attachment, &config).await {
            Ok(result) => prev = Some(result),
            Err(e) => {
                if let Err(undo) = del(plugins, attachment).await {
                    tracing::warn!("undoing a failed CNI ADD: {undo}");
                }
                return Err(e);
            }
        }
    }
    attachment.result = prev;
    Ok(())
}

/// DEL through the list in reverse. Every plugin is asked even when one
/// fails; the first failure is returned.
pub async fn del(plugins: &Plugins, attachment: &Attachment) -> Result<(), NetworkError> {
    let mut first_error = None;
    for plugin in plugins_of(&attachment.conflist)?.iter().rev() {
        let config = plugin_config(attachment, plugin, attachment.result.as_ref());
        if let Err(e) = exec(plugins, "DEL", attachment, &config).await {
            tracing::warn!("{e}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The addresses (CIDR) a result gave the container, for `ps`/`inspect`.
pub fn result_addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads an attachment record.
pub fn load(path: &Path) -> Result<Attachment, NetworkError> {
    let text = std::fs::read(path).map_err(|source| NetworkError::Io {
        what: format!("reading {}", path.display()),
        cause: source,
    })?;
    serde_json::from_slice(&text)
        .map_err(|e| NetworkError::Cni(format!("{} is not a CNI attachment: {e}", path.display())))
}

/// Writes an attachment record, atomically.
pub fn save(path: &Path, attachment: &Attachment) -> Result<(), NetworkError> {
    let tmp = path.with_extension("tmp");
    let io = |source| NetworkError::Io {
        what: format!("writing {}", path.display()),
        cause: source,
    };
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(attachment).unwrap_or_default(),
    )
    .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment() -> Attachment {
        Attachment {
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            conflist: json!({
                "cniVersion": "1.0.0",
                "name": "bulkhead",
                "plugins": [
                    {"type": "bridge", "bridge": "bh0"},
                    {"type": "portmap", "capabilities": {"portMappings": true}}
                ]
            }),
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }],
            result: None,
        }
    }

    #[test]
    fn plugins_get_name_version_previous_result_and_their_ports() {
        let a = attachment();
        let plugins = a.conflist["plugins"].as_array().unwrap().clone();
        let bridge = plugin_config(&a, &plugins[0], None);
        assert_eq!(bridge["name"], "bulkhead");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(bridge.get("prevResult").is_none() && bridge.get("runtimeConfig").is_none());
        let prev = json!({"ips": [{"address": "10.77.0.2/16"}]});
        let portmap = plugin_config(&a, &plugins[1], Some(&prev));
        assert_eq!(portmap["prevResult"], prev);
        assert_eq!(
            portmap["runtimeConfig"]["portMappings"][0],
            json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})
        );
        assert_eq!(result_addresses(&prev), vec!["10.77.0.2/16".to_owned()]);
    }

    #[test]
    fn a_missing_plugin_is_named_before_anything_runs() {
        let plugins = Plugins {
            dirs: vec![PathBuf::from("/nonexistent")],
        };
        let err = plugins
            .check(&attachment().conflist)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"bridge\"") && err.contains("containernetworking-plugins"),
            "{err}"
        );
        assert!(plugins.find("../bin/sh").is_err());
    }

    #[test]
    fn attachments_round_trip_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.json");
        let mut a = attachment();
        a.result = Some(json!({"ips": []}));
        save(&path, &a).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.port_mappings, a.port_mappings);
        assert_eq!(back.result, a.result);
    }
}
