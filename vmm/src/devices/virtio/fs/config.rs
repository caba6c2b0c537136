//! The virtio-fs mount tag and the device configuration space.

use thiserror::Error;

/// Longest tag the virtio-fs config space holds.
pub const TAG_MAX_LEN: usize = 36;

/// A virtio-fs mount tag: what the guest passes to `mount -t virtiofs TAG DIR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsTag(String);

/// A tag the device cannot carry.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FsTagError {
    /// Empty or longer than the config space allows.
    #[error("A virtio-fs tag must be 1 to {TAG_MAX_LEN} bytes, not {0}")]
    Length(usize),
    /// Characters that would not survive a mount command line.
    #[error("A virtio-fs tag may hold only letters, digits, '-', '_' and '.': {0:?}")]
    Characters(String),
}

impl FsTag {
    /// Checks and wraps `tag`.
    pub fn new(tag: &str) -> Result<FsTag, FsTagError> {
        if tag.is_empty() || tag.len() > TAG_MAX_LEN {
            return Err(FsTagError::Length(tag.len()));
        }
        if !tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(FsTagError::Characters(tag.to_owned()));
        }
        Ok(FsTag(tag.to_owned()))
    }

    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The device config space: the tag, NUL padded to 36 bytes, then the number
    /// of request queues (le32).
    pub fn config_space(&self, request_queues: u32) -> Vec<u8> {
        let mut config = vec![0u8; TAG_MAX_LEN];
        config[..self.0.len()].copy_from_slice(self.0.as_bytes());
        config.extend_from_slice(&request_queues.to_le_bytes());
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked() {
        assert!(FsTag::new("rootfs").is_ok());
        assert_eq!(FsTag::new(""), Err(FsTagError::Length(0)));
        assert_eq!(FsTag::new(&"a".repeat(37)), Err(FsTagError::Length(37)));
        assert!(matches!(FsTag::new("a b"), Err(FsTagError::Characters(_))));
    }

    #[test]
    fn config_space_layout() {
        let c = FsTag::new("share").unwrap().config_space(1);
        assert_eq!(c.len(), 40);
        assert_eq!(&c[..5], b"share");
        assert_eq!(c[5], 0);
        assert_eq!(&c[36..], &1u32.to_le_bytes());
    }
}
