//! Registry credentials from Docker's config file, so that `docker login` (or
//! `skopeo login --authfile`, `podman login` with a Docker config) is all a user
//! does to pull private images.
//!
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`: `credHelpers`
//! for the registry first, then an `auths` entry (`auth` = base64 `user:pass`,
//! or `username`/`password`, or `registrytoken`), then `credsStore`; otherwise
//! anonymous.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::error::{Result, StoreError};
use crate::reference::is_docker_hub;

/// The key Docker Hub's credentials are stored under.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// The Docker config file to read: `explicit`, else `$DOCKER_CONFIG/config.json`,
/// else `$HOME/.docker/config.json`.
pub(crate) fn config_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("config.json");
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".docker").join("config.json")
}

/// Credentials for `registry` (host\[:port\], `docker.io` for Docker Hub) from the
/// config at `path`; anonymous if it has none or does not exist.
pub(crate) fn credentials(registry: &str, path: &Path) -> Result<RegistryAuth> {
    let invalid = |reason: String| StoreError::DockerConfig {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(invalid(format!("cannot read it: {e}"))),
    };
    let config: DockerConfig =
        serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;

    if let Some(helper) = find(&config.cred_helpers, registry) {
        return from_helper(helper, registry);
    }
    if let Some(entry) = find(&config.auths, registry) {
        if let Some(auth) = from_entry(entry, registry).map_err(invalid)? {
            return Ok(auth);
        }
    }
    match &config.creds_store {
        Some(store) if !store.is_empty() => from_helper(store, registry),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

/// The value under the key naming `registry` (keys may be URLs, as Docker writes
/// them: `https://index.docker.io/v1/`, `https://host:5000`).
fn find<'a, T>(map: &'a BTreeMap<String, T>, registry: &str) -> Option<&'a T> {
    let wanted = registry.to_ascii_lowercase();
    map.iter().find_map(|(key, value)| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let same = host == wanted || (is_docker_hub(&host) && is_docker_hub(&wanted));
        same.then_some(value)
    })
}

fn from_entry(entry: &AuthEntry, registry: &str) -> Result<Option<RegistryAuth>, String> {
    if let Some(encoded) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| format!("the `auth` of {registry} is not base64: {e}"))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| format!("the `auth` of {registry} is not UTF-8"))?;
        let (user, pass) = text
            .split_once(':')
            .ok_or_else(|| format!("the `auth` of {registry} is not `user:password`"))?;
        return Ok(Some(RegistryAuth::Basic(user.into(), pass.into())));
    }
    if let (Some(user), Some(pass)) = (&entry.username, &entry.password) {
        return Ok(Some(RegistryAuth::Basic(user.clone(), pass.clone())));
    }
    if let Some(token) = &entry.registrytoken {
        return Ok(Some(RegistryAuth::Bearer(token.clone())));
    }
    if entry.identitytoken.is_some() {
        tracing::warn!(
            registry,
            "ignoring the identity token in the Docker config: bulkhead does not support OAuth refresh tokens; use a password or access token"
        );
    }
    Ok(None)
}

/// Ask `docker-credential-<helper> get` for `registry`'s credentials.
fn from_helper(helper: &str, registry: &str) -> Result<RegistryAuth> {
    let failed = |reason: String| StoreError::CredentialHelper {
        helper: helper.to_owned(),
        registry: registry.to_owned(),
        reason,
    };
    let server = if is_docker_hub(registry) {
        DOCKER_HUB_KEY
    } else {
        registry
    };
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run it: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .map_err(|e| failed(format!("cannot write to it: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(format!("cannot read its answer: {e}")))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if said.contains("credentials not found") {
            return Ok(RegistryAuth::Anonymous);
        }
        return Err(failed(format!(
            "it exited with {}: {}",
            out.status,
            said.trim()
        )));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|e| failed(format!("its answer is not the expected JSON: {e}")))?;
    if answer.username == "<token>" {
        tracing::warn!(registry, "credential helper returned an identity token, which bulkhead does not support; pulling anonymously");
        return Ok(RegistryAuth::Anonymous);
    }
    Ok(RegistryAuth::Basic(answer.username, answer.secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, json: &str) -> PathBuf {
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        path
    }

    #[test]
    fn auths_entries() {
        let dir = tempfile::tempdir().unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:x");
        let path = write(
            dir.path(),
            &format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{encoded}"}},
                    "localhost:5000": {{"username": "bob", "password": "pw"}},
                    "https://reg.example.com/v2/": {{"registrytoken": "tok"}}
                }}}}"#
            ),
        );
        let basic = |u: &str, p: &str| RegistryAuth::Basic(u.into(), p.into());
        assert_eq!(
            credentials("docker.io", &path).unwrap(),
            basic("alice", "s3cret:x")
        );
        assert_eq!(
            credentials("localhost:5000", &path).unwrap(),
            basic("bob", "pw")
        );
        assert_eq!(
            credentials("reg.example.com", &path).unwrap(),
            RegistryAuth::Bearer("tok".into())
        );
        assert_eq!(
            credentials("other:1", &path).unwrap(),
            RegistryAuth::Anonymous
        );
        assert_eq!(
            credentials("docker.io", &dir.path().join("missing.json")).unwrap(),
            RegistryAuth::Anonymous
        );
    }

    #[test]
    fn broken_config_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), r#"{"auths": {"r": {"auth": "%%%"}}}"#);
        let err = credentials("r", &path).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("base64"),
            "{err}"
        );
        let path = write(dir.path(), "{");
        assert!(credentials("r", &path).is_err());
    }

    #[test]
    fn missing_helper_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            r#"{"credHelpers": {"r:1": "bulkhead-no-such-helper"}}"#,
        );
        let err = credentials("r:1", &path).unwrap_err().to_string();
        assert!(
            err.contains("docker-credential-bulkhead-no-such-helper"),
            "{err}"
        );
        assert_eq!(
            credentials("other", &path).unwrap(),
            RegistryAuth::Anonymous
        );
    }
}
