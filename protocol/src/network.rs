//! The values of a [`ConfigureNetworkRequest`] parsed, once, the same way on
//! both sides: the host builds the request from these types, the agent
//! parses what arrived with them, so a value one side writes is exactly one
//! the other reads.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::agent::{ConfigureNetworkRequest, NetworkInterface, NetworkRoute};
use crate::limits::ValidationError;

/// Most addresses on the one interface (CNI gives one or two).
pub const MAX_ADDRESSES: usize = 16;
/// Most routes (CNI gives a handful).
pub const MAX_ROUTES: usize = 64;
/// Smallest MTU IPv4 allows.
pub const MIN_MTU: u32 = 68;
/// Largest MTU a Linux interface takes.
pub const MAX_MTU: u32 = 65_535;

/// A MAC address: why a type and not a string is that the guest sets it on
/// its NIC, and a multicast or malformed one would break the link silently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Whether the address may be an interface's own (not multicast).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl FromStr for Mac {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or("must be six octets")?;
            if part.len() != 2 {
                return Err("must be six two-digit hex octets separated by ':'");
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| "must be hex octets")?;
        }
        if parts.next().is_some() {
            return Err("must be six octets");
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// An address with its prefix length (`10.88.0.5/16`), or a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length: at most 32 for IPv4, 128 for IPv6.
    pub prefix: u8,
}

impl Cidr {
    /// Whether `addr` is inside this network (an address of the other
    /// family never is).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl FromStr for Cidr {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or("must be ADDRESS/PREFIX, e.g. 10.88.0.5/16")?;
        let addr: IpAddr = addr.parse().map_err(|_| "has an invalid IP address")?;
        let prefix: u8 = prefix.parse().map_err(|_| "has an invalid prefix length")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err("has a prefix length longer than the address");
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A route: to `destination`, through `gateway` or directly attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The network reached.
    pub destination: Cidr,
    /// The next hop, of the destination's family.
    pub gateway: Option<IpAddr>,
}

/// A whole [`ConfigureNetworkRequest`], parsed and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNetwork {
    /// The MAC the guest NIC takes (the host interface's, so the network
    /// behind it sees one address).
    pub mac: Mac,
    /// The MTU.
    pub mtu: u32,
    /// The interface's addresses.
    pub addresses: Vec<Cidr>,
    /// The routes.
    pub routes: Vec<Route>,
}

fn invalid(field: &'static str, reason: &'static str) -> ValidationError {
    ValidationError::Invalid { field, reason }
}

impl GuestNetwork {
    /// Parses and checks a request: every string, every count, every range.
    pub fn from_request(req: &ConfigureNetworkRequest) -> Result<Self, ValidationError> {
        let iface = req
            .interface
            .as_ref()
            .ok_or(ValidationError::Empty { field: "interface" })?;
        let mac: Mac = iface.mac.parse().map_err(|r| invalid("interface.mac", r))?;
        if !mac.is_unicast() {
            return Err(invalid("interface.mac", "must be unicast"));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&iface.mtu) {
            return Err(invalid("interface.mtu", "must be between 68 and 65535"));
        }
        if iface.addresses.len() > MAX_ADDRESSES {
            return Err(invalid("interface.addresses", "has more than 16 entries"));
        }
        if req.routes.len() > MAX_ROUTES {
            return Err(invalid("routes", "has more than 64 entries"));
        }
        let addresses = iface
            .addresses
            .iter()
            .map(|a| a.parse().map_err(|r| invalid("interface.addresses", r)))
            .collect::<Result<Vec<Cidr>, _>>()?;
        let routes = req
            .routes
            .iter()
            .map(|r| {
                let destination: Cidr = r
                    .destination
                    .parse()
                    .map_err(|e| invalid("routes.destination", e))?;
                let gateway = if r.gateway.is_empty() {
                    None
                } else {
                    let gw: IpAddr = r
                        .gateway
                        .parse()
                        .map_err(|_| invalid("routes.gateway", "is not an IP address"))?;
                    if gw.is_ipv4() != destination.addr.is_ipv4() {
                        return Err(invalid(
                            "routes.gateway",
                            "must be of the destination's address family",
                        ));
                    }
                    Some(gw)
                };
                Ok(Route {
                    destination,
                    gateway,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GuestNetwork {
            mac,
            mtu: iface.mtu,
            addresses,
            routes,
        })
    }

    /// The request that carries this network.
    pub fn to_request(&self) -> ConfigureNetworkRequest {
        let mut iface = NetworkInterface::new();
        iface.mac = self.mac.to_string();
        iface.mtu = self.mtu;
        iface.addresses = self.addresses.iter().map(Cidr::to_string).collect();
        let mut req = ConfigureNetworkRequest::new();
        req.interface = Some(iface).into();
        req.routes = self
            .routes
            .iter()
            .map(|r| {
                let mut route = NetworkRoute::new();
                route.destination = r.destination.to_string();
                route.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
                route
            })
            .collect();
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestNetwork {
        GuestNetwork {
            mac: "02:42:0a:58:00:05".parse().unwrap(),
            mtu: 1500,
            addresses: vec![
                "10.88.0.5/16".parse().unwrap(),
                "fd00::5/64".parse().unwrap(),
            ],
            routes: vec![
                Route {
                    destination: "0.0.0.0/0".parse().unwrap(),
                    gateway: Some("10.88.0.1".parse().unwrap()),
                },
                Route {
                    destination: "10.99.0.0/24".parse().unwrap(),
                    gateway: None,
                },
            ],
        }
    }

    #[test]
    fn a_network_survives_the_request() {
        let net = sample();
        assert_eq!(GuestNetwork::from_request(&net.to_request()).unwrap(), net);
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            "02:42:0A:58:00:05".parse::<Mac>().unwrap().to_string(),
            "02:42:0a:58:00:05"
        );
        for bad in [
            "",
            "02:42:0a:58:00",
            "02:42:0a:58:00:05:06",
            "2:42:0a:58:00:05",
            "zz:42:0a:58:00:05",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
        assert!(!"01:00:5e:00:00:01".parse::<Mac>().unwrap().is_unicast());
    }

    #[test]
    fn networks_contain_their_addresses() {
        let cidr: Cidr = "10.88.0.5/16".parse().unwrap();
        assert!(cidr.contains("10.88.255.1".parse().unwrap()));
        assert!(!cidr.contains("10.89.0.1".parse().unwrap()));
        let host: Cidr = "10.88.0.5/32".parse().unwrap();
        assert!(!host.contains("10.88.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6: Cidr = "fd00::5/64".parse().unwrap();
        assert!(v6.contains("fd00::1".parse().unwrap()));
        assert!(!v6.contains("10.88.0.1".parse().unwrap()));
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert!("10.0.0.1/33".parse::<Cidr>().is_err());
        assert!("10.0.0.1".parse::<Cidr>().is_err());
        assert!("fd00::1/129".parse::<Cidr>().is_err());
        assert!("fd00::1/128".parse::<Cidr>().is_ok());
    }

    #[test]
    fn bad_requests_name_their_field() {
        let field = |req: &ConfigureNetworkRequest| match GuestNetwork::from_request(req) {
            Err(ValidationError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut req = sample().to_request();
        req.interface.as_mut().unwrap().mtu = 20;
        assert_eq!(field(&req), "interface.mtu");
        let mut req = sample().to_request();
        req.interface.as_mut().unwrap().mac = "01:00:5e:00:00:01".into();
        assert_eq!(field(&req), "interface.mac");
        let mut req = sample().to_request();
        req.routes[0].gateway = "fd00::1".into();
        assert_eq!(field(&req), "routes.gateway");
        let mut req = sample().to_request();
        req.routes = (0..65).map(|_| req.routes[1].clone()).collect();
        assert_eq!(field(&req), "routes");
        let mut req = sample().to_request();
        req.interface = None.into();
        assert!(matches!(
            GuestNetwork::from_request(&req),
            Err(ValidationError::Empty { field: "interface" })
        ));
    }
}
