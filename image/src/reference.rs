//! Image names as Docker spells them: normalization, the short "familiar" form, and
//! which registries may be spoken to over plain HTTP.
//!
//! Names are parsed by oci-client's [`Reference`] (Docker's grammar: default
//! registry `docker.io`, `library/` for official images, tag `latest`), plus
//! bracketed IPv6 registries (`[::1]:5000/app`), which its grammar lacks.

use std::net::{IpAddr, Ipv6Addr};

use oci_client::{ParseError, Reference};

use crate::error::{Result, StoreError};

/// Docker Hub's registry name in normalized references.
const DOCKER_HUB: &str = "docker.io";
/// The namespace of Docker Hub's official images.
const OFFICIAL_PREFIX: &str = "library/";

/// The full, normalized form of an image reference, as the store records names:
/// `busybox` becomes `docker.io/library/busybox:latest`; tags and digests are kept.
///
/// Exists so that `busybox`, `library/busybox:latest` and
/// `docker.io/library/busybox` all name the same image, as in Docker.
pub fn normalize(reference: &str) -> Result<String> {
    Ok(parse(reference)?.whole())
}

/// The short form Docker shows for a normalized name:
/// `docker.io/library/busybox:latest` becomes `busybox:latest`,
/// `docker.io/team/app:1` becomes `team/app:1`; other registries are kept.
///
/// Exists for `bulkhead images`, which shows names the way people type them.
pub fn familiar(normalized: &str) -> String {
    let Some(rest) = normalized.strip_prefix("docker.io/") else {
        return normalized.to_owned();
    };
    match rest.strip_prefix(OFFICIAL_PREFIX) {
        // `library/x/y` is not an official image, keep its namespace.
        Some(official)
            if !official
                .split(['@', ':'])
                .next()
                .unwrap_or("")
                .contains('/') =>
        {
            official.to_owned()
        }
        _ => rest.to_owned(),
    }
}

/// Parse `reference` by Docker's rules into oci-client's [`Reference`].
pub(crate) fn parse(reference: &str) -> Result<Reference> {
    let invalid = |reason: String| StoreError::InvalidReference {
        reference: reference.to_owned(),
        reason,
    };
    if reference.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if reference
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            "it contains whitespace or control characters".into(),
        ));
    }
    if is_full_hex_id(reference) {
        return Err(invalid(
            "a 64-digit hexadecimal string is an image id, not a name".into(),
        ));
    }
    if reference.starts_with('[') {
        return parse_ipv6(reference).map_err(invalid);
    }
    Reference::try_from(reference).map_err(|e| invalid(parse_error_reason(reference, e)))
}

/// Why `reference` failed to parse, in words a person can act on.
fn parse_error_reason(reference: &str, error: ParseError) -> String {
    let lowercase_parses = Reference::try_from(reference.to_lowercase().as_str()).is_ok();
    let bad_digest = reference
        .split_once('@')
        .is_some_and(|(_, digest)| crate::digest::sha256_hex(digest).is_none());
    match error {
        ParseError::ReferenceInvalidFormat if lowercase_parses => {
            "the repository name must be lowercase".into()
        }
        ParseError::ReferenceInvalidFormat | ParseError::DigestInvalidLength if bad_digest => {
            "the digest after `@` must be `sha256:` and 64 lowercase hexadecimal digits".into()
        }
        ParseError::ReferenceInvalidFormat => {
            "invalid reference format (registry/repository:tag, lowercase repository)".into()
        }
        other => other.to_string(),
    }
}

/// `[v6addr](:port)/repository[:tag][@digest]`: the registry is checked here, the
/// rest by oci-client's grammar under a stand-in registry name.
fn parse_ipv6(reference: &str) -> Result<Reference, String> {
    let (host, rest) = reference
        .split_once('/')
        .ok_or_else(|| "a registry must be followed by a repository path".to_owned())?;
    let (addr, port) = match host.rsplit_once("]:") {
        Some((addr, port)) => (addr.trim_start_matches('['), Some(port)),
        None => (host.trim_start_matches('[').trim_end_matches(']'), None),
    };
    if addr.parse::<Ipv6Addr>().is_err() || port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(format!("{host:?} is not a valid [IPv6]:port registry"));
    }
    let stand_in = Reference::try_from(format!("ipv6.invalid/{rest}"))
        .map_err(|e| parse_error_reason(&format!("ipv6.invalid/{rest}"), e))?;
    let registry = host.to_owned();
    let repository = stand_in.repository().to_owned();
    Ok(match (stand_in.tag(), stand_in.digest()) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.into(), digest.into())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.into()),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").into()),
    })
}

/// Whether `text` is a whole image id without its `sha256:` prefix.
pub(crate) fn is_full_hex_id(text: &str) -> bool {
    text.len() == 64 && is_lower_hex(text)
}

/// Whether `text` is non-empty and only lowercase hexadecimal digits.
pub(crate) fn is_lower_hex(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The registry's host without the port: `localhost:5000` -> `localhost`,
/// `[::1]:5000` -> `[::1]`.
fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        return match registry.find(']') {
            Some(end) => &registry[..=end],
            None => registry,
        };
    }
    registry.split(':').next().unwrap_or(registry)
}

/// Whether `registry` (host\[:port\]) is this machine: `localhost`, 127.0.0.0/8 or
/// `[::1]`, on any port. These may always be spoken to over plain HTTP, as in Docker.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = host_of(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether `registry` may be spoken to over plain HTTP: loopback, or listed in
/// `insecure` (as `host:port`, or `host` for any port).
pub(crate) fn allows_plain_http(registry: &str, insecure: &[String]) -> bool {
    is_loopback(registry)
        || insecure.iter().any(|entry| {
            entry.eq_ignore_ascii_case(registry)
                || (!entry.contains(':') && entry.eq_ignore_ascii_case(host_of(registry)))
        })
}

/// `registry/repository` of a normalized reference, without tag or digest: the
/// part a repo digest (`name@sha256:...`) is built on.
pub(crate) fn repository_name(reference: &Reference) -> String {
    format!("{}/{}", reference.registry(), reference.repository())
}

/// Whether `name` is the Docker Hub registry, for credential lookups.
pub(crate) fn is_docker_hub(registry: &str) -> bool {
    matches!(
        registry,
        DOCKER_HUB | "index.docker.io" | "registry-1.docker.io"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_table() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let cases: &[(&str, &str)] = &[
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            (
                "index.docker.io/busybox",
                "docker.io/library/busybox:latest",
            ),
            ("team/app:v2", "docker.io/team/app:v2"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/x/y:1", "localhost:5000/x/y:1"),
            ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
            (
                "Registry.Example.com/a/b",
                "Registry.Example.com/a/b:latest",
            ),
            ("quay.io/a/b/c:Tag_1.0-x", "quay.io/a/b/c:Tag_1.0-x"),
            ("[::1]:5000/app:1", "[::1]:5000/app:1"),
            ("[::1]/app", "[::1]/app:latest"),
        ];
        for (input, expected) in cases {
            assert_eq!(normalize(input).unwrap(), *expected, "{input}");
        }
        assert_eq!(
            normalize(&format!("busybox@{digest}")).unwrap(),
            format!("docker.io/library/busybox@{digest}")
        );
        assert_eq!(
            normalize(&format!("localhost:5000/x/y@{digest}")).unwrap(),
            format!("localhost:5000/x/y@{digest}")
        );
        assert_eq!(
            normalize(&format!("busybox:1@{digest}")).unwrap(),
            format!("docker.io/library/busybox:1@{digest}")
        );
        assert_eq!(
            normalize(&format!("[::1]:5000/app@{digest}")).unwrap(),
            format!("[::1]:5000/app@{digest}")
        );
    }

    #[test]
    fn invalid_names_say_why() {
        let reason = |input: &str| match normalize(input) {
            Err(StoreError::InvalidReference { reason, .. }) => reason,
            other => panic!("{input}: {other:?}"),
        };
        assert!(reason("BusyBox").contains("lowercase"));
        assert!(reason("team/App:1").contains("lowercase"));
        assert!(reason("").contains("empty"));
        assert!(reason("busy box").contains("whitespace"));
        assert!(reason(&"a".repeat(64)).contains("image id"));
        assert!(reason("busybox@sha256:abc").contains("digest"));
        assert!(reason("busybox:").contains("invalid"));
        assert!(reason("[::zz]:5000/a").contains("IPv6"));
        let err = normalize("UPPER").unwrap_err().to_string();
        assert!(err.contains("\"UPPER\""), "{err}");
    }

    #[test]
    fn familiar_table() {
        let digest = format!("sha256:{}", "b".repeat(64));
        let cases = [
            (
                "docker.io/library/busybox:latest",
                "busybox:latest".to_owned(),
            ),
            ("docker.io/team/app:1", "team/app:1".to_owned()),
            ("docker.io/library/a/b:1", "library/a/b:1".to_owned()),
            ("localhost:5000/x/y:1", "localhost:5000/x/y:1".to_owned()),
            ("quay.io/library/x:1", "quay.io/library/x:1".to_owned()),
            (
                &format!("docker.io/library/busybox@{digest}"),
                format!("busybox@{digest}"),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(familiar(input), expected, "{input}");
        }
        // Familiar names normalize back to where they came from.
        for name in ["busybox:latest", "team/app:1", "localhost:5000/x/y:1"] {
            assert_eq!(familiar(&normalize(name).unwrap()), name);
        }
    }

    #[test]
    fn plain_http_only_for_loopback_or_listed() {
        for registry in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.0.0.2",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(allows_plain_http(registry, &[]), "{registry}");
        }
        for registry in [
            "docker.io",
            "10.0.0.1:5000",
            "[::2]:5000",
            "localhost.example",
        ] {
            assert!(!allows_plain_http(registry, &[]), "{registry}");
        }
        let insecure = vec!["reg.lan:5000".to_owned(), "other.lan".to_owned()];
        assert!(allows_plain_http("reg.lan:5000", &insecure));
        assert!(!allows_plain_http("reg.lan:5001", &insecure));
        assert!(allows_plain_http("other.lan:443", &insecure));
        assert!(allows_plain_http("other.lan", &insecure));
    }
}
