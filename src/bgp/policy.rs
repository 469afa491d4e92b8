//! PURE: what a session exports (next-hop-self, the fabric's VM prefixes)
//! and what it accepts (RFC 4456 loop checks, prefix and next-hop policy).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::Serialize;

use super::codec::PathAttrs;
use crate::config::Config;
use crate::intent::Intent;

/// The prefixes this hypervisor announces on `fabric`: its VMs' host
/// prefixes and routed extra addresses, limited to the fabric's subnets.
pub fn export(config: &Config, intent: &Intent, fabric: &str) -> BTreeSet<IpNet> {
    let Some(f) = config.fabric(fabric) else {
        return BTreeSet::new();
    };
    intent
        .interfaces()
        .filter(|(_, i)| i.fabric == fabric)
        .flat_map(|(_, i)| {
            i.host_prefixes()
                .chain(i.routed.iter().map(|r| r.prefix.trunc()))
                .collect::<Vec<_>>()
        })
        .filter(|p| f.subnets.iter().any(|s| s.contains(p)))
        .collect()
}

/// Why a received path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Not a VM subnet of the fabric, the default route or an accepted prefix.
    PrefixNotAllowed,
    /// One of this hypervisor's own prefixes (uplinks, reflectors, its VMs).
    OwnPrefix,
    /// The next hop is not on the session's uplink subnet.
    ForeignNextHop,
    /// ORIGINATOR_ID is our router id (RFC 4456 §8).
    OriginatorLoop,
    /// Our router id is in the CLUSTER_LIST (RFC 4456 §8).
    ClusterLoop,
    /// An attribute was malformed (RFC 7606 treat-as-withdraw).
    Malformed,
}

/// Import policy of one session.
#[derive(Debug, Clone)]
pub struct ImportPolicy {
    pub allowed: Vec<IpNet>,
    pub own: Vec<IpNet>,
    pub uplink_subnets: Vec<IpNet>,
    pub router_id: Ipv4Addr,
}

impl ImportPolicy {
    /// For a session of `fabric` on the uplink with `addresses`.
    pub fn new(config: &Config, fabric: &str, addresses: &[IpNet], extra_accept: &[IpNet]) -> Self {
        let mut allowed: Vec<IpNet> = config
            .fabric(fabric)
            .map(|f| f.subnets.clone())
            .unwrap_or_default();
        allowed.push("0.0.0.0/0".parse().expect("valid"));
        allowed.push("::/0".parse().expect("valid"));
        allowed.extend_from_slice(extra_accept);
        let mut own: Vec<IpNet> = Vec::new();
        for u in config.uplinks() {
            for a in &u.config.addresses {
                own.push(a.trunc());
            }
            for r in &u.config.reflectors {
                own.push(IpNet::from(*r));
            }
        }
        Self {
            allowed,
            own,
            uplink_subnets: addresses.iter().map(|a| a.trunc()).collect(),
            router_id: config.hypervisor.router_id,
        }
    }

    /// Accept or refuse one path. Paths for prefixes this hypervisor also
    /// announces (anycast) are kept: the RIB prefers the local route, and
    /// the remote paths take over when the local VM goes.
    pub fn check(&self, prefix: &IpNet, attrs: &PathAttrs) -> Result<(), Refusal> {
        if attrs.originator_id == Some(self.router_id) {
            return Err(Refusal::OriginatorLoop);
        }
        if attrs.cluster_list.contains(&self.router_id) {
            return Err(Refusal::ClusterLoop);
        }
        let is_default = prefix.prefix_len() == 0;
        // A /0 entry admits the default route only, not everything.
        if !is_default
            && !self
                .allowed
                .iter()
                .any(|a| a.prefix_len() > 0 && a.contains(prefix))
        {
            return Err(Refusal::PrefixNotAllowed);
        }
        if is_default && !self.allowed.iter().any(|a| a == prefix) {
            return Err(Refusal::PrefixNotAllowed);
        }
        if self
            .own
            .iter()
            .any(|o| o.contains(prefix) || (!is_default && prefix.contains(&o.network())))
        {
            return Err(Refusal::OwnPrefix);
        }
        match attrs.next_hop {
            Some(nh) if self.on_uplink(nh) => Ok(()),
            _ => Err(Refusal::ForeignNextHop),
        }
    }

    fn on_uplink(&self, nh: IpAddr) -> bool {
        self.uplink_subnets.iter().any(|s| s.contains(&nh))
    }
}

/// Refusal counters of one session.
pub type RefusalCounts = BTreeMap<Refusal, u64>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn cfg() -> Config {
        config::parse("t", include_str!("../../packaging/l3hv.toml")).unwrap()
    }

    fn attrs(nh: &str) -> PathAttrs {
        PathAttrs {
            next_hop: Some(nh.parse().unwrap()),
            local_pref: Some(100),
            as_path_len: 0,
            originator_id: None,
            cluster_list: vec![],
        }
    }

    fn policy() -> ImportPolicy {
        let c = cfg();
        ImportPolicy::new(&c, "public", &c.fabrics["public"].paths["a"].addresses, &[])
    }

    #[test]
    fn vm_prefix_from_another_hypervisor_is_accepted() {
        let p = policy();
        p.check(&"203.0.113.3/32".parse().unwrap(), &attrs("198.51.100.102"))
            .unwrap();
        p.check(&"0.0.0.0/0".parse().unwrap(), &attrs("198.51.100.1"))
            .unwrap();
    }

    #[test]
    fn refusals() {
        let p = policy();
        assert_eq!(
            p.check(&"192.0.2.0/24".parse().unwrap(), &attrs("198.51.100.102")),
            Err(Refusal::PrefixNotAllowed)
        );
        assert_eq!(
            p.check(&"203.0.113.3/32".parse().unwrap(), &attrs("192.0.2.1")),
            Err(Refusal::ForeignNextHop)
        );
        let mut a = attrs("198.51.100.102");
        a.originator_id = Some(cfg().hypervisor.router_id);
        assert_eq!(
            p.check(&"203.0.113.3/32".parse().unwrap(), &a),
            Err(Refusal::OriginatorLoop)
        );
        assert_eq!(
            p.check(
                &"198.51.100.0/25".parse().unwrap(),
                &attrs("198.51.100.102")
            ),
            Err(Refusal::PrefixNotAllowed)
        );
        let mut p2 = policy();
        p2.allowed.push("198.51.100.0/24".parse().unwrap());
        assert_eq!(
            p2.check(
                &"198.51.100.126/32".parse().unwrap(),
                &attrs("198.51.100.102")
            ),
            Err(Refusal::OwnPrefix)
        );
    }

    #[test]
    fn export_is_limited_to_the_fabric_and_its_subnets() {
        let c = cfg();
        let mut intent = Intent::default();
        let vm: crate::intent::VmIntent = serde_json::from_str(
            r#"{"name":"vm1","interfaces":[{"name":"tap1","mac":"52:54:00:00:00:01","fabric":"public",
               "ipv4":["203.0.113.1"],"ipv6":["2001:db8:cb00:7100::1"],
               "routed":[{"prefix":"203.0.113.10/32","via":"203.0.113.1"}]}]}"#,
        )
        .unwrap();
        intent.vms.insert("vm1".into(), vm);
        let e = export(&c, &intent, "public");
        assert_eq!(e.len(), 3);
        assert!(export(&c, &intent, "private").is_empty());
    }
}
