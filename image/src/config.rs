//! The image config blob (`application/vnd.oci.image.config.v1+json`, or Docker's
//! `application/vnd.docker.container.image.v1+json`): run defaults, creation time,
//! platform and the diff ids that the unpacked layers must match.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::digest::sha256_hex;
use crate::error::{Result, StoreError};
use crate::record::RunConfig;

/// What the store needs from an image config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageConfig {
    /// The run defaults.
    pub(crate) run: RunConfig,
    /// `created`.
    pub(crate) created: Option<String>,
    /// `os`, e.g. `linux`.
    pub(crate) os: Option<String>,
    /// `architecture`, e.g. `amd64`.
    pub(crate) architecture: Option<String>,
    /// `rootfs.diff_ids`: sha256 of each uncompressed layer, in order.
    pub(crate) diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigFile {
    created: Option<String>,
    architecture: Option<String>,
    os: Option<String>,
    #[serde(default)]
    config: Option<ContainerConfig>,
    rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    stop_signal: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Parse config blob `bytes` (digest `digest`) of image `reference`.
pub(crate) fn parse(bytes: &[u8], reference: &str, digest: &str) -> Result<ImageConfig> {
    let invalid = |reason: String| StoreError::InvalidConfig {
        reference: reference.to_owned(),
        digest: digest.to_owned(),
        reason,
    };
    let file: ConfigFile = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    let rootfs = file
        .rootfs
        .ok_or_else(|| invalid("it has no `rootfs` (not a container image?)".into()))?;
    if rootfs.kind != "layers" {
        return Err(invalid(format!(
            "rootfs.type is {:?}, not \"layers\"",
            rootfs.kind
        )));
    }
    if let Some(bad) = rootfs.diff_ids.iter().find(|d| sha256_hex(d).is_none()) {
        return Err(invalid(format!("diff id {bad:?} is not a sha256 digest")));
    }
    let c = file.config.unwrap_or_default();
    Ok(ImageConfig {
        run: RunConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
            stop_signal: c.stop_signal.filter(|s| !s.is_empty()),
            labels: c.labels.unwrap_or_default(),
        },
        created: file.created,
        os: file.os,
        architecture: file.architecture,
        diff_ids: rootfs.diff_ids,
    })
}

impl ImageConfig {
    /// Refuse images that cannot run in bulkhead's linux/amd64 guests.
    pub(crate) fn check_platform(&self, reference: &str, digest: &str) -> Result<()> {
        let os = self.os.as_deref().unwrap_or("linux");
        let arch = self.architecture.as_deref().unwrap_or("amd64");
        if os != "linux" || arch != "amd64" {
            return Err(StoreError::InvalidConfig {
                reference: reference.to_owned(),
                digest: digest.to_owned(),
                reason: format!(
                    "the image is for {os}/{arch}, but bulkhead runs linux/amd64 guests; \
                     pull or build a linux/amd64 variant"
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_defaults_and_diff_ids() {
        let diff = format!("sha256:{}", "1".repeat(64));
        let json = serde_json::json!({
            "created": "2024-01-02T03:04:05Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": ["/init"], "Cmd": null, "Env": ["A=b"],
                "WorkingDir": "/srv", "User": "1000:1000", "StopSignal": "SIGQUIT",
                "Labels": {"k": "v"}
            },
            "rootfs": {"type": "layers", "diff_ids": [diff]}
        });
        let config = parse(json.to_string().as_bytes(), "img", "sha256:c").unwrap();
        assert_eq!(config.run.entrypoint, vec!["/init"]);
        assert!(config.run.cmd.is_empty());
        assert_eq!(config.run.env, vec!["A=b"]);
        assert_eq!(config.run.working_dir, "/srv");
        assert_eq!(config.run.user, "1000:1000");
        assert_eq!(config.run.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(config.run.labels["k"], "v");
        assert_eq!(config.created.as_deref(), Some("2024-01-02T03:04:05Z"));
        assert_eq!(config.diff_ids, vec![diff]);
        config.check_platform("img", "sha256:c").unwrap();
    }

    #[test]
    fn refuses_what_is_not_an_image() {
        let err = parse(b"{}", "img", "sha256:c").unwrap_err().to_string();
        assert!(err.contains("rootfs") && err.contains("sha256:c"), "{err}");
        let bad = r#"{"rootfs":{"type":"layers","diff_ids":["md5:x"]}}"#;
        assert!(parse(bad.as_bytes(), "img", "d").is_err());
        let arm = r#"{"os":"linux","architecture":"arm64","rootfs":{"type":"layers"}}"#;
        let config = parse(arm.as_bytes(), "img", "d").unwrap();
        let err = config.check_platform("img", "d").unwrap_err().to_string();
        assert!(err.contains("linux/arm64"), "{err}");
    }
}
