//! The sandbox's network inside the guest: the VM's one virtio NIC, moved
//! into the sandbox's network namespace (the spare one the first container
//! gets, see [`crate::spare_netns`]) and given the host's MAC, MTU,
//! addresses and routes over netlink.
//!
//! The NIC is moved rather than configured where it is because containers
//! never live in the guest's initial namespace; and it is configured after
//! the move because moving an interface between namespaces drops its
//! addresses. The MAC is set every time: a VM resumed from a template still
//! has the template's.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use bulkhead_protocol::network::GuestNetwork;
use futures_util::TryStreamExt;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// The NIC's name inside the sandbox's namespace, the name CNI gives the
/// container's interface on runc.
pub const GUEST_IFNAME: &str = "eth0";

/// Why the network could not be set.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The VM has no network interface besides `lo`.
    #[error("the VM has no network interface (is the VMM's virtio-net device there?)")]
    NoInterface,
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: rtnetlink::Error,
    },
    /// Entering the namespace or opening a socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// Moves the NIC into the namespace pinned at `netns` and configures it
/// there. Runs on a thread of its own with its own small runtime: entering a
/// namespace changes the calling thread, and a netlink socket belongs to the
/// namespace of the thread that opened it.
pub fn configure(net: &GuestNetwork, netns: &Path) -> Result<(), NetworkError> {
    let ns = File::open(netns).map_err(|source| NetworkError::Io {
        what: "opening the sandbox's network namespace",
        source,
    })?;
    let net = net.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| NetworkError::Io {
                what: "starting a runtime for netlink",
                source,
            })?;
        // In the guest's initial namespace: find the NIC and hand it over.
        runtime.block_on(move_nic(&ns, &net))?;
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| NetworkError::Io {
            what: "entering the sandbox's network namespace",
            source: e.into(),
        })?;
        runtime.block_on(configure_nic(&net))
    })
    .join()
    .map_err(|_| NetworkError::Io {
        what: "configuring the network",
        source: std::io::Error::other("the network thread panicked"),
    })?
}

fn connect() -> Result<Handle, NetworkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetworkError::Io {
            what: "opening a netlink socket",
            source,
        })?;
    tokio::spawn(connection);
    Ok(handle)
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// The first interface that is not loopback: the VM has one NIC.
async fn move_nic(ns: &File, net: &GuestNetwork) -> Result<(), NetworkError> {
    let handle = connect()?;
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing the VM's interfaces"))?;
    let nic = links
        .iter()
        .find(|l| link_name(l).is_some_and(|n| n != "lo"))
        .ok_or(NetworkError::NoInterface)?;
    let index = nic.header.index;
    let name = link_name(nic).unwrap_or("?").to_owned();
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .down()
                .address(net.mac.0.to_vec())
                .mtu(net.mtu)
                .name(GUEST_IFNAME.to_owned())
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!("setting the MAC and MTU of {name}")))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!(
            "moving {name} into the sandbox's namespace"
        )))
}

async fn configure_nic(net: &GuestNetwork) -> Result<(), NetworkError> {
    let handle = connect()?;
    let nic = handle
        .link()
        .get()
        .match_name(GUEST_IFNAME.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(netlink("finding eth0 in the sandbox's namespace"))?
        .ok_or(NetworkError::NoInterface)?;
    let index = nic.header.index;
    for addr in &net.addresses {
        handle
            .address()
            .add(index, addr.addr, addr.prefix)
            .execute()
            .await
            .map_err(netlink(format!("adding address {addr} to eth0")))?;
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink("setting eth0 up"))?;
    for route in &net.routes {
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.destination.addr, route.destination.prefix)
            .map_err(|e| NetworkError::Io {
                what: "building a route",
                source: std::io::Error::other(e.to_string()),
            })?
            .output_interface(index);
        builder = match route.gateway {
            Some(gw) => {
                let b = builder.gateway(gw).map_err(|e| NetworkError::Io {
                    what: "building a route",
                    source: std::io::Error::other(e.to_string()),
                })?;
                // A gateway outside every subnet of the interface (a /32
                // address, as some CNI plugins give) is reached on the link.
                if net.addresses.iter().any(|a| a.contains(gw)) {
                    b
                } else {
                    b.onlink()
                }
            }
            None => builder.scope(RouteScope::Link),
        };
        handle
            .route()
            .add(builder.build())
            .execute()
            .await
            .map_err(netlink(format!(
                "adding the route to {} via {}",
                route.destination,
                route.gateway.map_or("eth0".to_owned(), |g| g.to_string())
            )))?;
    }
    Ok(())
}
