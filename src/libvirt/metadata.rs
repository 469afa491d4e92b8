//! PURE: libvirt domain XML → [`VmIntent`].
//!
//! Reads the domain's `<interface type='ethernet'>` devices and l3hv's own
//! `<metadata>` element (namespace [`NAMESPACE`]). Called by the hook (XML
//! from stdin) and by the agent's libvirt connection (XML from
//! `virDomainGetXMLDesc`). It never talks to libvirt or the agent, and the
//! XML is untrusted: every problem is an error naming what is wrong, never a
//! panic. Checks that need the configuration (fabric names, subnets) are left
//! to [`VmIntent::validate`] in the agent.
//!
//! The metadata, one `<l3hv:interface>` per routed NIC, matched by MAC:
//!
//! ```xml
//! <metadata>
//!   <l3hv:vm xmlns:l3hv="https://l3hv.net/xmlns/domain/1">
//!     <l3hv:interface mac="52:54:00:00:00:01" fabric="public">
//!       <l3hv:ip address="203.0.113.1"/>            <!-- IPv4 or IPv6 host address -->
//!       <l3hv:ip address="2001:db8:cb00:7100::1"/>
//!       <l3hv:prefix address="2001:db8:cb00:7101::/64"/>  <!-- IPv6 prefix routed to the VM -->
//!       <l3hv:route prefix="203.0.113.10/32" via="203.0.113.1"/>  <!-- extra, via the VM -->
//!     </l3hv:interface>
//!   </l3hv:vm>
//! </metadata>
//! ```
//!
//! The link mode follows the device: `<target dev='X' managed='no'/>` is a
//! tap l3hv creates before QEMU opens it (`tap`, or `tap-multi-queue` with
//! `<driver queues='N'/>`, N > 1); `managed='yes'` or no `managed` attribute
//! is a tap libvirt creates, which l3hv adopts (its name is known once the
//! domain runs). A metadata entry whose MAC matches no ethernet interface
//! (a NIC not plugged yet) and an ethernet interface without a target name
//! are skipped.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv6Net};
use roxmltree::{Document, Node};

use crate::intent::{InterfaceIntent, LinkMode, MacAddr, RoutedAddr, VmIntent};

/// l3hv's XML namespace in libvirt domain metadata.
pub const NAMESPACE: &str = "https://l3hv.net/xmlns/domain/1";

/// Largest domain XML accepted (libvirt's own limit is 10 MB; a domain with
/// many devices stays far below 1 MB).
pub const MAX_XML: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("domain XML is larger than {MAX_XML} bytes")]
    TooLarge,
    #[error("domain XML: {0}")]
    Xml(String),
    #[error("domain XML: root element is <{0}>, not <domain>")]
    NotDomain(String),
    #[error("domain XML: no <name>")]
    NoName,
    #[error("domain {domain}: l3hv metadata: {reason}")]
    Metadata { domain: String, reason: String },
}

/// One `<interface>` device of the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Nic {
    kind: String,
    mac: Option<MacAddr>,
    target: Option<String>,
    managed: Option<String>,
    queues: u32,
}

/// The domain's name, without looking at anything else.
pub fn domain_name(xml: &str) -> Result<String, MetadataError> {
    let doc = parse_doc(xml)?;
    name_of(&doc)
}

/// Parses a domain XML. `Ok(None)`: the domain has no l3hv metadata, and
/// l3hv leaves it alone.
pub fn parse(xml: &str) -> Result<Option<VmIntent>, MetadataError> {
    let doc = parse_doc(xml)?;
    let name = name_of(&doc)?;
    let root = doc.root_element();
    let fail = |reason: String| MetadataError::Metadata {
        domain: name.clone(),
        reason,
    };
    let mut ours = root
        .children()
        .filter(|n| n.has_tag_name("metadata"))
        .flat_map(|m| m.children())
        .filter(|n| n.is_element() && n.tag_name().namespace() == Some(NAMESPACE));
    let Some(meta) = ours.next() else {
        return Ok(None);
    };
    if ours.next().is_some() {
        return Err(fail("more than one element in the l3hv namespace".into()));
    }
    if meta.tag_name().name() != "vm" {
        return Err(fail(format!(
            "<{}>: the l3hv metadata element must be <vm>",
            meta.tag_name().name()
        )));
    }

    let nics: Vec<Nic> = root
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("interface"))
        .map(nic)
        .collect::<Result<_, String>>()
        .map_err(&fail)?;

    let mut interfaces = Vec::new();
    let mut seen = BTreeSet::new();
    for entry in meta.children().filter(Node::is_element) {
        if entry.tag_name().namespace() != Some(NAMESPACE) || entry.tag_name().name() != "interface"
        {
            return Err(fail(format!(
                "unexpected <{}> in <vm> (only <interface>)",
                entry.tag_name().name()
            )));
        }
        let mac: MacAddr = required(entry, "interface", "mac")
            .and_then(|m| m.parse())
            .map_err(&fail)?;
        if !seen.insert(mac) {
            return Err(fail(format!("interface {mac} is listed twice")));
        }
        let fabric = required(entry, "interface", "fabric").map_err(&fail)?;
        let mut matching = nics.iter().filter(|n| n.mac == Some(mac));
        let Some(dev) = matching.next() else {
            // Not plugged (yet): hotplug brings it with a DEVICE_ADDED event.
            continue;
        };
        if matching.next().is_some() {
            return Err(fail(format!("two <interface> devices have MAC {mac}")));
        }
        if dev.kind != "ethernet" {
            return Err(fail(format!(
                "interface {mac} is <interface type='{}'>; l3hv routes only type='ethernet'",
                dev.kind
            )));
        }
        let Some(target) = dev.target.clone() else {
            // A libvirt-managed tap without a name yet (before start).
            continue;
        };
        let link = match dev.managed.as_deref() {
            Some("no") if dev.queues > 1 => LinkMode::TapMultiQueue,
            Some("no") => LinkMode::Tap,
            Some("yes") | None => LinkMode::Adopt,
            Some(other) => {
                return Err(fail(format!(
                    "interface {mac}: managed='{other}' is neither 'yes' nor 'no'"
                )));
            }
        };
        let mut i = InterfaceIntent {
            name: target,
            mac,
            fabric,
            link,
            ipv4: Vec::new(),
            ipv6: Vec::new(),
            ipv6_prefixes: Vec::new(),
            routed: Vec::new(),
        };
        addresses(entry, &mut i).map_err(|e| fail(format!("interface {mac}: {e}")))?;
        interfaces.push(i);
    }
    Ok(Some(VmIntent { name, interfaces }))
}

fn parse_doc(xml: &str) -> Result<Document<'_>, MetadataError> {
    if xml.len() > MAX_XML {
        return Err(MetadataError::TooLarge);
    }
    // DTDs (and so entity expansion) are refused by default.
    let doc = Document::parse(xml).map_err(|e| MetadataError::Xml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return Err(MetadataError::NotDomain(root.tag_name().name().to_string()));
    }
    Ok(doc)
}

fn name_of(doc: &Document<'_>) -> Result<String, MetadataError> {
    let name = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text())
        .map(str::trim)
        .unwrap_or_default();
    if name.is_empty() {
        return Err(MetadataError::NoName);
    }
    Ok(name.to_string())
}

fn nic(n: Node<'_, '_>) -> Result<Nic, String> {
    let child = |tag: &str| n.children().find(|c| c.has_tag_name(tag));
    let mac = match child("mac").and_then(|m| m.attribute("address")) {
        Some(m) => Some(m.parse::<MacAddr>()?),
        None => None,
    };
    let target = child("target");
    let queues = match child("driver").and_then(|d| d.attribute("queues")) {
        Some(q) => q
            .parse::<u32>()
            .map_err(|_| format!("<driver queues='{q}'> is not a number"))?,
        None => 1,
    };
    Ok(Nic {
        kind: n.attribute("type").unwrap_or_default().to_string(),
        mac,
        target: target
            .and_then(|t| t.attribute("dev"))
            .filter(|d| !d.is_empty())
            .map(str::to_string),
        managed: target
            .and_then(|t| t.attribute("managed"))
            .map(str::to_string),
        queues,
    })
}

fn required(n: Node<'_, '_>, tag: &str, attr: &str) -> Result<String, String> {
    n.attribute(attr)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("<{tag}> needs a {attr}=\"...\" attribute"))
}

fn addresses(entry: Node<'_, '_>, i: &mut InterfaceIntent) -> Result<(), String> {
    for e in entry.children().filter(Node::is_element) {
        let tag = e.tag_name().name();
        if e.tag_name().namespace() != Some(NAMESPACE) {
            return Err(format!("<{tag}> is not in the l3hv namespace"));
        }
        match tag {
            "ip" => {
                let a = required(e, tag, "address")?;
                match a.parse::<IpAddr>() {
                    Ok(IpAddr::V4(v4)) => i.ipv4.push(v4),
                    Ok(IpAddr::V6(v6)) => i.ipv6.push(v6),
                    Err(_) => {
                        return Err(format!(
                            "<ip address='{a}'> is not an IP address (use <prefix> for a prefix)"
                        ));
                    }
                }
            }
            "prefix" => {
                let a = required(e, tag, "address")?;
                let p = a
                    .parse::<Ipv6Net>()
                    .map_err(|_| format!("<prefix address='{a}'> is not an IPv6 prefix"))?;
                if p.trunc() != p {
                    return Err(format!(
                        "<prefix address='{a}'> has host bits set; did you mean {}?",
                        p.trunc()
                    ));
                }
                i.ipv6_prefixes.push(p);
            }
            "route" => {
                let prefix = required(e, tag, "prefix")?;
                let via = required(e, tag, "via")?;
                let prefix = prefix
                    .parse::<IpNet>()
                    .or_else(|_| prefix.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("<route prefix='{prefix}'> is not a prefix"))?;
                let via = via
                    .parse::<IpAddr>()
                    .map_err(|_| format!("<route via='{via}'> is not an IP address"))?;
                i.routed.push(RoutedAddr { prefix, via });
            }
            other => {
                return Err(format!(
                    "unexpected <{other}> (only <ip>, <prefix> and <route>)"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example shipped for operators must parse to what it documents.
    const EXAMPLE: &str = include_str!("../../hooks/example-domain.xml");

    /// A domain as `virsh dumpxml` prints it for a running guest, with a
    /// libvirt-managed NIC, an unrouted bridge NIC and multi-queue.
    const RUNNING: &str = r#"<domain type='kvm' id='7'>
  <name>web-3</name>
  <uuid>8b5c0e2a-3b1e-4a57-9f55-7f6b0b0e4c21</uuid>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:name>web-3</nova:name>
    </nova:instance>
    <lh:vm xmlns:lh="https://l3hv.net/xmlns/domain/1">
      <lh:interface mac="52:54:00:aa:00:01" fabric="public">
        <lh:ip address="203.0.113.7"/>
        <lh:ip address="2001:db8:cb00:7100::7"/>
        <lh:route prefix="203.0.113.10/32" via="203.0.113.7"/>
        <lh:route prefix="2001:db8:cb00:7100:5254:33ff:fe00:100" via="2001:db8:cb00:7100::7"/>
      </lh:interface>
      <lh:interface mac="52:54:00:aa:00:02" fabric="private">
        <lh:ip address="172.22.2.7"/>
      </lh:interface>
      <lh:interface mac="52:54:00:aa:00:09" fabric="private">
        <lh:ip address="172.22.2.9"/>
      </lh:interface>
    </lh:vm>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='ethernet'>
      <mac address='52:54:00:AA:00:01'/>
      <target dev='tap-web3' managed='no'/>
      <model type='virtio'/>
      <driver name='vhost' queues='4'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <interface type='ethernet'>
      <mac address='52:54:00:aa:00:02'/>
      <target dev='vnet12'/>
      <model type='virtio'/>
      <alias name='net1'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:00:03'/>
      <source bridge='br0'/>
      <target dev='vnet13'/>
    </interface>
  </devices>
</domain>
"#;

    fn with_meta(meta: &str, devices: &str) -> String {
        format!(
            "<domain type='qemu'><name>vm1</name><metadata>{meta}</metadata><devices>{devices}</devices></domain>"
        )
    }

    const TAP: &str = "<interface type='ethernet'><mac address='52:54:00:00:00:01'/><target dev='tap1' managed='no'/><model type='virtio'/></interface>";

    #[test]
    fn example_parses_as_documented() {
        let vm = parse(EXAMPLE).unwrap().unwrap();
        assert_eq!(vm.name, "vm1");
        assert_eq!(vm.interfaces.len(), 1);
        let i = &vm.interfaces[0];
        assert_eq!(i.name, "vm1-eth0");
        assert_eq!(i.link, LinkMode::Tap);
        assert_eq!(i.fabric, "public");
        assert_eq!(
            i.ipv4,
            vec!["203.0.113.1".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(i.ipv6.len(), 1);
        assert_eq!(i.routed.len(), 2);
    }

    #[test]
    fn running_domain_with_prefix_and_modes() {
        let vm = parse(RUNNING).unwrap().unwrap();
        assert_eq!(vm.name, "web-3");
        // The third metadata entry (…:09) has no device: skipped.
        assert_eq!(vm.interfaces.len(), 2);
        let a = &vm.interfaces[0];
        assert_eq!(a.name, "tap-web3");
        assert_eq!(a.mac.to_string(), "52:54:00:aa:00:01");
        assert_eq!(a.link, LinkMode::TapMultiQueue);
        assert_eq!(a.routed[0].prefix.to_string(), "203.0.113.10/32");
        assert_eq!(
            a.routed[1].prefix.to_string(),
            "2001:db8:cb00:7100:5254:33ff:fe00:100/128"
        );
        let b = &vm.interfaces[1];
        assert_eq!(b.name, "vnet12");
        assert_eq!(b.link, LinkMode::Adopt);
        assert_eq!(b.fabric, "private");
    }

    #[test]
    fn no_l3hv_metadata_is_none() {
        let xml = with_meta(
            "<x:y xmlns:x='http://example.org/other'/>",
            "<interface type='network'><source network='default'/></interface>",
        );
        assert_eq!(parse(&xml).unwrap(), None);
        let xml = "<domain type='kvm'><name>plain</name><devices/></domain>";
        assert_eq!(parse(xml).unwrap(), None);
        assert_eq!(domain_name(xml).unwrap(), "plain");
    }

    #[test]
    fn prefix_per_vm_and_prepare_time_managed_tap() {
        let meta = format!(
            "<l3hv:vm xmlns:l3hv='{NAMESPACE}'><l3hv:interface mac='52:54:00:00:00:01' fabric='public'><l3hv:prefix address='2001:db8:cb00:7101::/64'/></l3hv:interface><l3hv:interface mac='52:54:00:00:00:02' fabric='public'><l3hv:ip address='203.0.113.2'/></l3hv:interface></l3hv:vm>"
        );
        // Second NIC: libvirt-managed, no name before start.
        let devs = format!(
            "{TAP}<interface type='ethernet'><mac address='52:54:00:00:00:02'/></interface>"
        );
        let vm = parse(&with_meta(&meta, &devs)).unwrap().unwrap();
        assert_eq!(vm.interfaces.len(), 1);
        assert_eq!(
            vm.interfaces[0].ipv6_prefixes[0].to_string(),
            "2001:db8:cb00:7101::/64"
        );
    }

    fn err(meta_body: &str, devices: &str) -> String {
        let meta = format!("<l3hv:vm xmlns:l3hv='{NAMESPACE}'>{meta_body}</l3hv:vm>");
        parse(&with_meta(&meta, devices)).unwrap_err().to_string()
    }

    #[test]
    fn bad_metadata_gives_clear_errors() {
        let iface = |body: &str| {
            format!(
                "<l3hv:interface mac='52:54:00:00:00:01' fabric='public'>{body}</l3hv:interface>"
            )
        };
        for (meta, devices, want) in [
            (
                iface("<l3hv:ip address='203.0.113.300'/>"),
                TAP.to_string(),
                "is not an IP address",
            ),
            (iface("<l3hv:ip/>"), TAP.into(), "needs a address="),
            (
                iface("<l3hv:prefix address='2001:db8::1/64'/>"),
                TAP.into(),
                "host bits",
            ),
            (
                iface("<l3hv:prefix address='203.0.113.0/24'/>"),
                TAP.into(),
                "not an IPv6 prefix",
            ),
            (
                iface("<l3hv:route prefix='x' via='203.0.113.1'/>"),
                TAP.into(),
                "not a prefix",
            ),
            (
                iface("<l3hv:route prefix='198.18.0.0/24'/>"),
                TAP.into(),
                "needs a via=",
            ),
            (iface("<l3hv:bogus/>"), TAP.into(), "unexpected <bogus>"),
            (
                iface("<ip address='203.0.113.1'/>"),
                TAP.into(),
                "not in the l3hv namespace",
            ),
            (
                "<l3hv:interface fabric='public'/>".into(),
                TAP.into(),
                "needs a mac=",
            ),
            (
                "<l3hv:interface mac='zz' fabric='public'/>".into(),
                TAP.into(),
                "not a MAC",
            ),
            (
                "<l3hv:interface mac='52:54:00:00:00:01'/>".into(),
                TAP.into(),
                "needs a fabric=",
            ),
            (
                format!("{}{}", iface(""), iface("")),
                TAP.into(),
                "listed twice",
            ),
            (
                iface(""),
                TAP.replace("ethernet", "bridge"),
                "only type='ethernet'",
            ),
            (iface(""), format!("{TAP}{TAP}"), "two <interface> devices"),
            (
                iface(""),
                TAP.replace("'no'", "'maybe'"),
                "neither 'yes' nor 'no'",
            ),
            (
                iface(""),
                TAP.replace("<model", "<driver queues='many'/><model"),
                "not a number",
            ),
            ("<l3hv:nic/>".into(), TAP.into(), "only <interface>"),
        ] {
            let e = err(&meta, &devices);
            assert!(e.contains(want), "want {want:?} in {e:?}");
            assert!(e.starts_with("domain vm1: l3hv metadata: "), "{e}");
        }
    }

    #[test]
    fn malformed_documents_are_errors_not_panics() {
        for xml in [
            "",
            "<domain",
            "<domain><name>a</name>",
            "<notdomain><name>x</name></notdomain>",
            "<domain><devices/></domain>",
            "<domain><name>  </name></domain>",
            "<!DOCTYPE d [<!ENTITY a 'aaaa'>]><domain><name>&a;</name></domain>",
            "\u{0}\u{1}binary",
        ] {
            assert!(parse(xml).is_err(), "{xml:?} should fail");
        }
        let big = format!("<domain><name>{}</name></domain>", "a".repeat(MAX_XML));
        assert_eq!(parse(&big).unwrap_err(), MetadataError::TooLarge);
        // Two l3hv elements.
        let meta = format!("<a:vm xmlns:a='{NAMESPACE}'/><b:vm xmlns:b='{NAMESPACE}'/>");
        assert!(parse(&with_meta(&meta, TAP)).is_err());
        let meta = format!("<a:other xmlns:a='{NAMESPACE}'/>");
        assert!(
            parse(&with_meta(&meta, TAP))
                .unwrap_err()
                .to_string()
                .contains("must be <vm>")
        );
    }

    #[test]
    fn truncated_and_mutated_inputs_never_panic() {
        let text = RUNNING;
        for cut in (0..text.len()).step_by(7) {
            if text.is_char_boundary(cut) {
                let _ = parse(&text[..cut]);
            }
        }
        for (i, _) in text.char_indices().step_by(5) {
            let mut s = text.to_string();
            s.replace_range(i..i + 1, "\"");
            let _ = parse(&s);
        }
    }
}
