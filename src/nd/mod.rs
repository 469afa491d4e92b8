//! Neighbour discovery for a whole shared IPv6 subnet: the IPv6 side of
//! `arp_whole_subnet` (`FabricConfig::nd_whole_subnet`).
//!
//! On a `shared-dhcpv6` fabric a guest sees the /64 on-link and sends a
//! neighbour solicitation for every peer it talks to. The kernel answers by
//! proxy only for addresses with an NTF_PROXY entry on the tap, which l3hv
//! adds once the address is routed; a solicitation that arrives before
//! that goes unanswered and the guest retries only after a second (every
//! first ping to a new address, measured by `benches/first_ping.py`).
//! Linux has no proxy entry for a prefix, so this answers in user space,
//! as ndppd did for the seed: one AF_PACKET socket per VM interface, with a
//! classic BPF filter that passes only ICMPv6 neighbour solicitations, and
//! a solicited advertisement (not router, not override: as the kernel's
//! proxy answers) with the tap's MAC for
//! any target in the fabric's shared subnets other than the VM's own
//! addresses. What reaches the hypervisor for an address not routed yet is
//! dropped by the fabric table, as it is today; the guest's neighbour entry
//! is simply ready when the route arrives.
//!
//! ```text
//!  agent ── watch<Arc<Intent>> ──► supervise ── watch<Policy> ──► io::serve (one task per interface)
//!                                                                  NS ─► wire::parse/decide ─► NA
//! ```

pub mod io;
pub mod wire;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::watch;
use tracing::info;

use crate::config::{Config, Ipv6Mode};
use crate::intent::Intent;
use crate::services::Registry;
use wire::Policy;

#[derive(Debug, thiserror::Error)]
pub enum NdError {
    #[error("nd {ifname}: socket: {source}")]
    Socket {
        ifname: String,
        source: std::io::Error,
    },
}

/// The responder policy of every VM interface that gets one.
pub fn policies(config: &Config, intent: &Intent) -> BTreeMap<String, Policy> {
    intent
        .interfaces()
        .filter_map(|(_, i)| {
            let f = config.fabric(&i.fabric)?;
            if f.ipv6_mode != Ipv6Mode::SharedDhcpv6 || !f.nd_whole_subnet {
                return None;
            }
            let subnets: Vec<ipnet::Ipv6Net> = f
                .subnets
                .iter()
                .filter_map(|n| match n {
                    IpNet::V6(n) => Some(n.trunc()),
                    IpNet::V4(_) => None,
                })
                .collect();
            if subnets.is_empty() {
                return None;
            }
            let own = i
                .host_prefixes()
                .filter_map(|p| match p.addr() {
                    IpAddr::V6(a) if p.prefix_len() == 128 => Some(a),
                    _ => None,
                })
                .chain(i.routed.iter().filter_map(|r| match r.prefix {
                    IpNet::V6(p) if p.prefix_len() == 128 => Some(p.addr()),
                    _ => None,
                }))
                .collect();
            Some((
                i.name.clone(),
                Policy {
                    gateway: f.gateway_v6,
                    subnets,
                    own,
                },
            ))
        })
        .collect()
}

/// Follows the intent and runs one [`io::serve`] task per interface of a
/// `nd_whole_subnet` fabric. Returns when the intent watch closes.
pub async fn supervise(
    config: Arc<Config>,
    intent: watch::Receiver<Arc<Intent>>,
    registry: Registry,
) {
    crate::services::per_interface(
        intent,
        "nd",
        |i| policies(&config, i),
        |name, p, rx| {
            info!(interface = %name, subnets = p.subnets.len(), "nd: answering for the shared subnet");
            tokio::spawn(io::serve(name.to_string(), rx, registry.interface(name)))
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::intent::{InterfaceIntent, LinkMode, RoutedAddr, VmIntent};

    fn cfg() -> Config {
        config::parse("t", include_str!("../../packaging/l3hv.toml")).unwrap()
    }

    fn intent(fabric: &str) -> Intent {
        let mut i = Intent::default();
        i.vms.insert(
            "vm1".into(),
            VmIntent {
                name: "vm1".into(),
                interfaces: vec![InterfaceIntent {
                    name: "tap1".into(),
                    mac: "52:54:00:00:00:01".parse().unwrap(),
                    fabric: fabric.into(),
                    link: LinkMode::Tap,
                    ipv4: vec!["203.0.113.1".parse().unwrap()],
                    ipv6: vec!["2001:db8:cb00:7100::1".parse().unwrap()],
                    ipv6_prefixes: vec![],
                    routed: vec![RoutedAddr {
                        prefix: "2001:db8:cb00:7100::10/128".parse().unwrap(),
                        via: "2001:db8:cb00:7100::1".parse().unwrap(),
                    }],
                }],
            },
        );
        i
    }

    #[test]
    fn shared_dhcpv6_interfaces_answer_for_the_subnet_but_their_own_addresses() {
        let p = policies(&cfg(), &intent("public"));
        let p = &p["tap1"];
        assert_eq!(p.gateway, "fe80::1".parse::<std::net::Ipv6Addr>().unwrap());
        assert_eq!(p.subnets, ["2001:db8:cb00:7100::/64".parse().unwrap()]);
        let own: Vec<std::net::Ipv6Addr> = vec![
            "2001:db8:cb00:7100::1".parse().unwrap(),
            "2001:db8:cb00:7100::10".parse().unwrap(),
        ];
        assert_eq!(p.own, own);
    }

    #[test]
    fn other_modes_and_the_switch_get_no_responder() {
        let mut c = cfg();
        c.fabrics.get_mut("public").unwrap().nd_whole_subnet = false;
        assert!(policies(&c, &intent("public")).is_empty());
        let mut c = cfg();
        c.fabrics.get_mut("public").unwrap().ipv6_mode = Ipv6Mode::PrefixPerVm;
        assert!(policies(&c, &intent("public")).is_empty());
        // The private fabric has no IPv6 subnet.
        let mut c = cfg();
        c.fabrics.get_mut("private").unwrap().ipv6_mode = Ipv6Mode::SharedDhcpv6;
        assert!(policies(&c, &intent("private")).is_empty());
    }
}
