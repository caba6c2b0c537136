//! The device's MAC address: parsed and checked once, from the config.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A unicast, non-zero Ethernet address, the only kind a NIC may have
/// (Linux replaces any other with a random one, which would surprise the
/// host side that chose this one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr([u8; 6]);

/// Why a string is not a usable MAC address.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MacError {
    /// Not six two-digit hex octets separated by colons.
    #[error(
        "{0:?} is not a MAC address: write 6 two-digit hex octets separated by ':', \
         e.g. 02:00:00:00:00:01"
    )]
    Format(String),
    /// A group address: bit 0 of the first octet is set.
    #[error(
        "{0} is a multicast address (bit 0 of the first octet is set); a NIC needs a unicast \
         one, e.g. 02:00:00:00:00:01"
    )]
    Multicast(String),
    /// All zeros.
    #[error("00:00:00:00:00:00 is not a valid NIC address; use e.g. 02:00:00:00:00:01")]
    Zero,
}

impl MacAddr {
    /// The six octets, in wire order (as the config space holds them).
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let format = || MacError::Format(s.to_owned());
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(format)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| format())?;
        }
        if parts.next().is_some() {
            return Err(format());
        }
        if octets == [0; 6] {
            return Err(MacError::Zero);
        }
        if octets[0] & 1 != 0 {
            return Err(MacError::Multicast(s.to_owned()));
        }
        Ok(MacAddr(octets))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicast_addresses_parse_in_either_case() {
        let mac: MacAddr = "02:aB:00:10:ff:7e".parse().unwrap();
        assert_eq!(mac.octets(), [0x02, 0xab, 0x00, 0x10, 0xff, 0x7e]);
        assert_eq!(mac.to_string(), "02:ab:00:10:ff:7e");
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02-00-00-00-00-01",
            "2:00:00:00:00:01",
            "002:00:00:00:00:1",
            "02:00:00:00:00:0g",
            "+2:00:00:00:00:01",
            "02:00:00:00:00:01:",
        ] {
            assert_eq!(
                bad.parse::<MacAddr>(),
                Err(MacError::Format(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacError::Multicast("01:00:5e:00:00:01".into()))
        );
        assert_eq!("00:00:00:00:00:00".parse::<MacAddr>(), Err(MacError::Zero));
        let message = "ff:ff:ff:ff:ff:ff"
            .parse::<MacAddr>()
            .unwrap_err()
            .to_string();
        assert!(message.contains("multicast"), "{message}");
    }
}
