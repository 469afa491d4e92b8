//! Intent: what the operator (hook, D-Bus, CLI) wants routed, VM by VM.
//!
//! Owns the model ([`VmIntent`], [`InterfaceIntent`], [`RoutedAddr`]), its
//! validation against the configuration, and its persistence ([`store`]).
//! It never looks at the kernel: the reconciler turns intent into kernel
//! state.

pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::config::{Config, valid_ifname};

/// A MAC address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in &mut out {
            let p = parts
                .next()
                .ok_or_else(|| format!("`{s}` is not a MAC address"))?;
            if p.len() != 2 {
                return Err(format!("`{s}` is not a MAC address"));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("`{s}` is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("`{s}` is not a MAC address"));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How the agent gets the VM's host-side interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LinkMode {
    /// Create a persistent tap that libvirt opens with `managed='no'`
    /// (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`), deleted when the interface goes.
    #[default]
    Tap,
    /// As `Tap`, with `IFF_MULTI_QUEUE` (for `<driver queues='N'>`).
    TapMultiQueue,
    /// Use an interface someone else created (a libvirt-managed tap, a
    /// veth); never created nor deleted by l3hv.
    Adopt,
}

/// An address routed to the VM through one of its own addresses (anycast,
/// extra IPs): `route <prefix> via <via> dev <tap> onlink`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutedAddr {
    pub prefix: IpNet,
    pub via: IpAddr,
}

/// One VM interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceIntent {
    /// Host-side interface name (the tap).
    pub name: String,
    pub mac: MacAddr,
    pub fabric: String,
    #[serde(default)]
    pub link: LinkMode,
    #[serde(default)]
    pub ipv4: Vec<Ipv4Addr>,
    #[serde(default)]
    pub ipv6: Vec<Ipv6Addr>,
    /// IPv6 prefixes routed to the VM (a /64 per VM).
    #[serde(default)]
    pub ipv6_prefixes: Vec<Ipv6Net>,
    #[serde(default)]
    pub routed: Vec<RoutedAddr>,
}

impl InterfaceIntent {
    /// Every address and prefix routed to this interface directly.
    pub fn host_prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.ipv4
            .iter()
            .map(|a| IpNet::from(IpAddr::V4(*a)))
            .chain(self.ipv6.iter().map(|a| IpNet::from(IpAddr::V6(*a))))
            .chain(self.ipv6_prefixes.iter().map(|p| IpNet::V6(p.trunc())))
    }

    fn owns(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => self.ipv4.contains(&a),
            IpAddr::V6(a) => {
                self.ipv6.contains(&a) || self.ipv6_prefixes.iter().any(|p| p.contains(&a))
            }
        }
    }
}

/// One VM and its interfaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmIntent {
    pub name: String,
    pub interfaces: Vec<InterfaceIntent>,
}

/// Everything the agent intends: VM name → VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub vms: BTreeMap<String, VmIntent>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntentError {
    #[error("vm name must be 1 to 64 printable characters without '/'")]
    BadVmName,
    #[error("vm {vm}: interface {ifname}: {reason}")]
    Interface {
        vm: String,
        ifname: String,
        reason: String,
    },
    #[error("vm {vm}: {reason}")]
    Vm { vm: String, reason: String },
    #[error("vm {0} is not known")]
    UnknownVm(String),
}

impl VmIntent {
    /// Checks the VM on its own and against the configuration.
    pub fn validate(&self, config: &Config) -> Result<(), IntentError> {
        if self.name.is_empty()
            || self.name.len() > 64
            || self.name.chars().any(|c| c == '/' || c.is_control())
        {
            return Err(IntentError::BadVmName);
        }
        if self.interfaces.is_empty() {
            return Err(IntentError::Vm {
                vm: self.name.clone(),
                reason: "has no interfaces".into(),
            });
        }
        let mut names = BTreeSet::new();
        let uplinks: BTreeSet<&str> = config
            .uplinks()
            .iter()
            .map(|u| u.config.interface.as_str())
            .collect();
        for i in &self.interfaces {
            let fail = |reason: String| IntentError::Interface {
                vm: self.name.clone(),
                ifname: i.name.clone(),
                reason,
            };
            if !valid_ifname(&i.name) {
                return Err(fail("not a valid interface name".into()));
            }
            if !names.insert(i.name.as_str()) {
                return Err(fail("listed twice".into()));
            }
            if uplinks.contains(i.name.as_str()) || i.name == "lo" {
                return Err(fail("is an uplink of the hypervisor".into()));
            }
            if i.mac.0[0] & 1 == 1 || i.mac.0 == [0; 6] {
                return Err(fail(format!("{} is not a unicast MAC address", i.mac)));
            }
            let fabric = config
                .fabric(&i.fabric)
                .ok_or_else(|| fail(format!("fabric `{}` is not configured", i.fabric)))?;
            for a in &i.ipv4 {
                let a = IpAddr::V4(*a);
                if !fabric.subnets.iter().any(|n| n.contains(&a)) {
                    return Err(fail(format!(
                        "{a} is outside the subnets of fabric `{}`",
                        i.fabric
                    )));
                }
                if Some(a) == fabric.gateway_v4.map(IpAddr::V4) {
                    return Err(fail(format!("{a} is the fabric's gateway address")));
                }
            }
            for a in &i.ipv6 {
                if a.is_unspecified() || a.is_multicast() || a.segments()[0] & 0xffc0 == 0xfe80 {
                    return Err(fail(format!("{a} is not a global unicast address")));
                }
                if !fabric.subnets.iter().any(|n| n.contains(&IpAddr::V6(*a))) {
                    return Err(fail(format!(
                        "{a} is outside the subnets of fabric `{}`",
                        i.fabric
                    )));
                }
            }
            for p in &i.ipv6_prefixes {
                if p.prefix_len() < 48 {
                    return Err(fail(format!("{p} is wider than /48")));
                }
                if !fabric
                    .subnets
                    .iter()
                    .any(|n| n.contains(&IpNet::V6(p.trunc())))
                {
                    return Err(fail(format!(
                        "{p} is outside the subnets of fabric `{}`",
                        i.fabric
                    )));
                }
            }
            for r in &i.routed {
                if r.prefix.addr().is_ipv4() != r.via.is_ipv4() {
                    return Err(fail(format!(
                        "{} via {}: address families differ",
                        r.prefix, r.via
                    )));
                }
                if !i.owns(r.via) {
                    return Err(fail(format!(
                        "{} via {}: the via must be one of this interface's addresses",
                        r.prefix, r.via
                    )));
                }
            }
        }
        Ok(())
    }
}

impl Intent {
    /// Checks that `vm` may replace whatever has its name: no interface name
    /// or address collides with another VM.
    pub fn check_insert(&self, vm: &VmIntent) -> Result<(), IntentError> {
        for (name, other) in &self.vms {
            if *name == vm.name {
                continue;
            }
            for oi in &other.interfaces {
                for i in &vm.interfaces {
                    let fail = |reason: String| IntentError::Interface {
                        vm: vm.name.clone(),
                        ifname: i.name.clone(),
                        reason,
                    };
                    if oi.name == i.name {
                        return Err(fail(format!("already belongs to vm {name}")));
                    }
                    if oi.mac == i.mac && oi.fabric == i.fabric {
                        return Err(fail(format!("MAC {} already belongs to vm {name}", i.mac)));
                    }
                    if oi.fabric == i.fabric {
                        let theirs: BTreeSet<IpNet> = oi.host_prefixes().collect();
                        if let Some(p) = i.host_prefixes().find(|p| theirs.contains(p)) {
                            return Err(fail(format!("{p} already belongs to vm {name}")));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Every interface with its VM name.
    pub fn interfaces(&self) -> impl Iterator<Item = (&str, &InterfaceIntent)> {
        self.vms
            .values()
            .flat_map(|vm| vm.interfaces.iter().map(move |i| (vm.name.as_str(), i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn cfg() -> Config {
        config::parse("t", include_str!("../../packaging/l3hv.toml")).unwrap()
    }

    pub fn vm(name: &str, ifname: &str, v4: &str) -> VmIntent {
        VmIntent {
            name: name.into(),
            interfaces: vec![InterfaceIntent {
                name: ifname.into(),
                mac: "52:54:00:00:00:01".parse().unwrap(),
                fabric: "public".into(),
                link: LinkMode::Tap,
                ipv4: vec![v4.parse().unwrap()],
                ipv6: vec![],
                ipv6_prefixes: vec![],
                routed: vec![],
            }],
        }
    }

    #[test]
    fn mac_round_trip() {
        let m: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:0f:00".parse::<MacAddr>().is_err());
        assert!("zz:54:00:ab:cd:0f".parse::<MacAddr>().is_err());
    }

    #[test]
    fn valid_vm_passes() {
        vm("vm1", "tap1", "203.0.113.1").validate(&cfg()).unwrap();
    }

    #[test]
    fn address_outside_fabric_is_refused() {
        let e = vm("vm1", "tap1", "192.0.2.1").validate(&cfg()).unwrap_err();
        assert!(e.to_string().contains("outside the subnets"), "{e}");
    }

    #[test]
    fn unknown_fabric_and_bad_names_are_refused() {
        let mut v = vm("vm1", "tap1", "203.0.113.1");
        v.interfaces[0].fabric = "nope".into();
        assert!(v.validate(&cfg()).is_err());
        let v = vm("vm1", "this-name-is-too-long", "203.0.113.1");
        assert!(v.validate(&cfg()).is_err());
        let v = vm("vm1", "a-public", "203.0.113.1");
        assert!(v.validate(&cfg()).is_err());
    }

    #[test]
    fn routed_via_must_be_own_address() {
        let mut v = vm("vm1", "tap1", "203.0.113.1");
        v.interfaces[0].routed.push(RoutedAddr {
            prefix: "198.18.0.0/24".parse().unwrap(),
            via: "203.0.113.2".parse().unwrap(),
        });
        assert!(v.validate(&cfg()).is_err());
        v.interfaces[0].routed[0].via = "203.0.113.1".parse().unwrap();
        v.validate(&cfg()).unwrap();
    }

    #[test]
    fn collisions_between_vms_are_refused() {
        let mut intent = Intent::default();
        let a = vm("vm1", "tap1", "203.0.113.1");
        intent.vms.insert(a.name.clone(), a);
        let mut b = vm("vm2", "tap1", "203.0.113.2");
        b.interfaces[0].mac = "52:54:00:00:00:02".parse().unwrap();
        assert!(intent.check_insert(&b).is_err());
        b.interfaces[0].name = "tap2".into();
        intent.check_insert(&b).unwrap();
        b.interfaces[0].ipv4 = vec!["203.0.113.1".parse().unwrap()];
        assert!(intent.check_insert(&b).is_err());
    }
}
