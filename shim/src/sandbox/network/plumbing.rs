//! Joining the VM's tap to the interface CNI (or an engine) made, inside the
//! sandbox's network namespace, the way Kata's "tcfilter" model does: an
//! ingress qdisc on each and a u32 match-all filter that redirects every
//! frame arriving on one to the other's egress. No bridge, no IP stack in
//! the path, and whatever is on the other side of the interface (a veth to a
//! bridge, a macvlan, ...) works the same.
//!
//! It also reads what the guest must take over from that interface: its
//! MAC (the network behind it knows only that one), MTU, addresses and
//! routes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_protocol::network::{Cidr, GuestNetwork, Mac, Route};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::NetworkError;

/// The main routing table's id.
const RT_TABLE_MAIN: u8 = 254;
/// `ETH_P_ALL` in network order, as tc wants a filter's protocol.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's parent handle (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink {
        what,
        cause: source,
    }
}

/// Opens a netlink connection in the calling thread's namespace; its task
/// runs on the current runtime.
pub fn connect() -> Result<Handle, NetworkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetworkError::Io {
            what: "opening a netlink socket".into(),
            cause: source,
        })?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<LinkMessage, NetworkError> {
    handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(|e| NetworkError::NoInterface {
            name: name.to_owned(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| NetworkError::NoInterface {
            name: name.to_owned(),
            reason: "not found".into(),
        })
}

/// The bridge that joins tap and interface when the sandbox has an egress
/// policy (see [`super::egress`]).
pub const POLICY_BRIDGE: &str = "br0_bh";

/// Reads `ifname`'s identity, brings `tap` up with its MTU and redirects
/// every frame between the two. Returns what the guest must take.
pub async fn join(handle: &Handle, ifname: &str, tap: &str) -> Result<GuestNetwork, NetworkError> {
    let (guest, index, tap_index) = identity_and_tap(handle, ifname, tap).await?;
    for (from, to, name) in [(index, tap_index, ifname), (tap_index, index, tap)] {
        handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(netlink(format!("adding an ingress qdisc to {name}")))?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            .protocol(ETH_P_ALL_BE)
            .redirect(to)
            .map_err(netlink("building the redirect filter"))?
            .execute()
            .await
            .map_err(netlink(format!("redirecting {name}'s frames")))?;
    }
    Ok(guest)
}

/// Like [`join`], but through a bridge whose two ports are the tap and the
/// interface, so that frames pass nftables' bridge hooks (an egress policy
/// needs them; tc redirects skip netfilter). The interface gives its MAC to
/// the guest and takes a new one: a bridge delivers frames for its ports'
/// own addresses to itself, not across. It gives up its addresses too:
/// with the namespace still holding the guest's address, the namespace's
/// own stack answered ARP for it (with the bridge's MAC), and the host then
/// sent the connections to a published port there instead of to the guest.
pub async fn join_bridged(
    handle: &Handle,
    ifname: &str,
    tap: &str,
) -> Result<GuestNetwork, NetworkError> {
    let (guest, index, tap_index) = identity_and_tap(handle, ifname, tap).await?;
    release_addresses(handle, index, ifname).await?;
    let mut own = crate::random::bytes::<6>();
    own[0] = (own[0] & 0xfe) | 0x02;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .address(own.to_vec())
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!("giving {ifname} a new MAC")))?;
    handle
        .link()
        .add(
            rtnetlink::LinkBridge::new(POLICY_BRIDGE)
                .mtu(guest.mtu)
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!("making bridge {POLICY_BRIDGE}")))?;
    let bridge = link_by_name(handle, POLICY_BRIDGE).await?.header.index;
    for (port, name) in [(index, ifname), (tap_index, tap)] {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(port)
                    .controller(bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("adding {name} to {POLICY_BRIDGE}")))?;
    }
    // CNI's bridge may hairpin the guest's broadcasts back through the
    // interface; learning the guest's MAC there would send its replies away
    // from the tap. The interface's side has nothing of its own to learn.
    handle
        .link()
        .set_port(
            rtnetlink::LinkBridgePort::new(index)
                .learning(false)
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!("turning learning off on {ifname}")))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(bridge).up().build())
        .execute()
        .await
        .map_err(netlink(format!("setting {POLICY_BRIDGE} up")))?;
    Ok(guest)
}

/// Reads `ifname`'s identity and brings `tap` up with its MTU; returns the
/// guest's settings and both interfaces' indices.
async fn identity_and_tap(
    handle: &Handle,
    ifname: &str,
    tap: &str,
) -> Result<(GuestNetwork, u32, u32), NetworkError> {
    let iface = link_by_name(handle, ifname).await?;
    let index = iface.header.index;
    let mut mac = None;
    let mut mtu = 1500;
    for attr in &iface.attributes {
        match attr {
            LinkAttribute::Address(bytes) if bytes.len() == 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(bytes);
                mac = Some(Mac(m));
            }
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let mac = mac.ok_or_else(|| NetworkError::NoInterface {
        name: ifname.to_owned(),
        reason: "it has no Ethernet address (only Ethernet interfaces can be joined to a VM)"
            .into(),
    })?;
    let addresses = addresses(handle, index).await?;
    let mut routes = routes_of(
        handle,
        index,
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
    )
    .await?;
    routes.extend(
        routes_of(
            handle,
            index,
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        )
        .await?,
    );

    let tap_index = link_by_name(handle, tap).await?.header.index;
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(netlink(format!("setting {tap} up")))?;
    let guest = GuestNetwork {
        mac,
        mtu,
        addresses,
        routes,
    };
    Ok((guest, index, tap_index))
}

/// Deletes the interface's global addresses (and with them the routes
/// through them): the guest has taken them.
async fn release_addresses(handle: &Handle, index: u32, ifname: &str) -> Result<(), NetworkError> {
    let messages: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink("reading the interface's addresses"))?;
    for m in messages
        .into_iter()
        .filter(|m| m.header.scope == AddressScope::Universe)
    {
        handle
            .address()
            .del(m)
            .execute()
            .await
            .map_err(netlink(format!("removing {ifname}'s addresses")))?;
    }
    Ok(())
}

/// The interface's global addresses (link-local ones the guest makes itself).
async fn addresses(handle: &Handle, index: u32) -> Result<Vec<Cidr>, NetworkError> {
    let messages: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink("reading the interface's addresses"))?;
    Ok(messages
        .iter()
        .filter(|m| m.header.scope == AddressScope::Universe)
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(addr) => Some(Cidr {
                    addr: *addr,
                    prefix: m.header.prefix_len,
                }),
                _ => None,
            })
        })
        .collect())
}

/// The main table's routes out of the interface, but for the ones the kernel
/// made for its own subnets (the guest's kernel makes those when it gets the
/// addresses).
async fn routes_of(
    handle: &Handle,
    index: u32,
    family: RouteMessage,
) -> Result<Vec<Route>, NetworkError> {
    let messages: Vec<RouteMessage> = handle
        .route()
        .get(family)
        .execute()
        .try_collect()
        .await
        .map_err(netlink("reading the routes"))?;
    Ok(messages
        .iter()
        .filter_map(|m| guest_route(m, index))
        .collect())
}

fn guest_route(m: &RouteMessage, index: u32) -> Option<Route> {
    if m.header.table != RT_TABLE_MAIN
        || m.header.kind != RouteType::Unicast
        || m.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut oif = None;
    let mut destination = None;
    let mut gateway = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(a) => destination = ip(a),
            RouteAttribute::Gateway(a) => gateway = ip(a),
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    let unspecified = match m.header.address_family {
        rtnetlink::packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    // IPv6 routes the kernel adds for link-local and multicast are not ours.
    let addr = destination.unwrap_or(unspecified);
    if let IpAddr::V6(v6) = addr {
        if v6.segments()[0] & 0xffc0 == 0xfe80 || v6.is_multicast() {
            return None;
        }
    }
    Some(Route {
        destination: Cidr {
            addr,
            prefix: m.header.destination_prefix_length,
        },
        gateway,
    })
}

fn ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}
