//! Random bytes from getrandom(2), which blocks only until the kernel's pool
//! is initialised: for ids and for the seed each guest gets at start.

/// `N` random bytes.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    fill(&mut bytes);
    bytes
}

/// `n` random bytes as lowercase hex.
pub fn hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fill(bytes: &mut [u8]) {
    let n = bytes.len();
    let mut filled = 0;
    while filled < n {
        // SAFETY: getrandom(2) writes at most `n - filled` bytes into the
        // buffer's tail, which we own and which is that long.
        let got = unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if got > 0 {
            filled += got as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // Never seen on Linux >= 3.17; the pid and time still differ per run.
            let fallback = format!("{}{:?}", std::process::id(), std::time::SystemTime::now());
            for (i, b) in fallback.bytes().enumerate() {
                bytes[i % n] ^= b;
            }
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_draws_differ() {
        assert_ne!(super::bytes::<16>(), super::bytes::<16>());
        assert_eq!(super::hex(6).len(), 12);
    }
}
