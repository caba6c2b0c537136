//! sha256 digests: checking their form and hashing content as it streams past.
//!
//! Every byte the store keeps is checked against the digest that names it, while
//! it is being written or unpacked, so nothing is read twice just to verify it.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// The hex part of `digest` if it is a well-formed `sha256:<64 lowercase hex>`.
///
/// Other algorithms are refused: the store names blobs by sha256 only, as
/// registries and `docker save` do in practice.
pub(crate) fn sha256_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|hex| crate::reference::is_full_hex_id(hex))
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_of(bytes: &[u8]) -> String {
    let mut hasher = Hasher::default();
    hasher.update(bytes);
    hasher.finish()
}

/// A running sha256 that also counts bytes.
#[derive(Default, Clone)]
pub(crate) struct Hasher {
    sha: Sha256,
    len: u64,
}

impl Hasher {
    /// Hash `bytes` too.
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// How many bytes were hashed.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// `sha256:<hex>` of everything hashed.
    pub(crate) fn finish(self) -> String {
        let hex: String = self
            .sha
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256:{hex}")
    }
}

/// A reader that hashes what is read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    /// Hash everything read from `inner`.
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::default(),
        }
    }

    /// Read `inner` to its end (hashing it), then return the digest and length.
    pub(crate) fn drain(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        let len = self.hasher.len();
        Ok((self.hasher.finish(), len))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form() {
        let hex = "0".repeat(64);
        assert_eq!(sha256_hex(&format!("sha256:{hex}")), Some(hex.as_str()));
        assert_eq!(sha256_hex(&hex), None);
        assert_eq!(sha256_hex(&format!("sha512:{hex}")), None);
        assert_eq!(sha256_hex(&format!("sha256:{}", "A".repeat(64))), None);
        assert_eq!(sha256_hex("sha256:../../etc/passwd"), None);
    }

    #[test]
    fn hashing() {
        // sha256("abc"), the FIPS 180-2 test vector.
        let abc = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_of(b"abc"), abc);
        let (digest, len) = HashingReader::new(&b"abc"[..]).drain().unwrap();
        assert_eq!((digest.as_str(), len), (abc, 3));
    }
}
