//! Configuration: one TOML file → a validated [`Config`].
//!
//! Owns the schema and every rule about what a valid configuration is. It is
//! read at start, by `l3hvd --check-config`, and by the CLI (to find the
//! control socket). It never touches the kernel: a bad file is refused before
//! anything else runs. Every error names the file, line, column and field.

mod locate;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml_edit::ImDocument;

pub use locate::KeyPath;

/// Where the daemon and the CLI look when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/l3hv/l3hv.toml";

/// One problem in a configuration file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub line: usize,
    pub column: usize,
    pub field: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{}", render_issues(file, issues))]
    Invalid {
        file: String,
        issues: Vec<ConfigIssue>,
    },
}

fn render_issues(file: &str, issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|i| {
            if i.field.is_empty() {
                format!("{file}:{}:{}: {}", i.line, i.column, i.message)
            } else {
                format!(
                    "{file}:{}:{}: field `{}`: {}",
                    i.line, i.column, i.field, i.message
                )
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------- schema --

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub kernel: KernelConfig,
    /// Fabric name → fabric. Names are operator's choice (`public`, `private`).
    pub fabrics: BTreeMap<String, FabricConfig>,
    #[serde(default)]
    pub bgp: BgpConfig,
    #[serde(default)]
    pub bfd: BfdConfig,
    #[serde(default)]
    pub dhcp: DhcpConfig,
    #[serde(default)]
    pub ra: RaConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub dbus: DbusConfig,
    #[serde(default)]
    pub libvirt: LibvirtConfig,
}

/// The Prometheus metrics endpoint (`GET /metrics`); off unless `listen`
/// is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address and port to serve on, e.g. "127.0.0.1:9475". Bound
    /// at start; a reload does not move it.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// The embedded BGP speaker: one MP-BGP session (IPv4 + IPv6 unicast) per
/// reflector listed under each fabric path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BgpConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Proposed hold time; the session uses the smaller of both sides'.
    #[serde(default = "default_hold_time", with = "humantime_serde")]
    pub hold_time: Duration,
    /// First connect-retry delay; doubles per failure up to 60s.
    #[serde(default = "default_connect_retry", with = "humantime_serde")]
    pub connect_retry: Duration,
    /// GTSM (RFC 5082): send TTL/hop limit 255 and require 255.
    #[serde(default = "default_true")]
    pub gtsm: bool,
    /// Send ADD-PATH (receive is always offered).
    #[serde(default)]
    pub add_path_send: bool,
    /// Advertise graceful restart with this restart time.
    #[serde(default, with = "humantime_serde")]
    pub graceful_restart: Option<Duration>,
    #[serde(default = "default_local_pref")]
    pub local_pref: u32,
    /// Per session; exceeding it sends Cease/Maximum Number of Prefixes
    /// Reached (RFC 4486).
    #[serde(default = "default_max_prefixes")]
    pub max_prefixes: usize,
    /// Prefixes accepted besides the fabric's VM subnets and the default.
    #[serde(default)]
    pub accept: Vec<IpNet>,
    /// TCP port of the reflectors.
    #[serde(default = "default_bgp_port")]
    pub port: u16,
    /// TCP-MD5 (RFC 2385) key shared with the reflectors; absent: off.
    #[serde(default)]
    pub password: Option<String>,
}

impl Default for BgpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            hold_time: default_hold_time(),
            connect_retry: default_connect_retry(),
            gtsm: true,
            add_path_send: false,
            graceful_restart: None,
            local_pref: default_local_pref(),
            max_prefixes: default_max_prefixes(),
            accept: Vec::new(),
            port: default_bgp_port(),
            password: None,
        }
    }
}

/// BFD (RFC 5880/5881) on every BGP session: single hop, asynchronous
/// mode. The defaults are the seed's (500 ms x 3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BfdConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Desired Min TX Interval once the session is Up (1 s before).
    #[serde(default = "default_bfd_interval", with = "humantime_serde")]
    pub min_tx: Duration,
    /// Required Min RX Interval.
    #[serde(default = "default_bfd_interval", with = "humantime_serde")]
    pub min_rx: Duration,
    /// Detect Mult.
    #[serde(default = "default_bfd_multiplier")]
    pub multiplier: u8,
    /// Keyed SHA1 authentication; absent: none.
    #[serde(default)]
    pub auth: Option<BfdAuthConfig>,
}

impl Default for BfdConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_tx: default_bfd_interval(),
            min_rx: default_bfd_interval(),
            multiplier: default_bfd_multiplier(),
            auth: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BfdAuthConfig {
    #[serde(rename = "type")]
    pub kind: crate::bfd::packet::AuthType,
    #[serde(default = "default_bfd_key_id")]
    pub key_id: u8,
    /// 1 to 20 octets.
    pub key: String,
}

fn default_bfd_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_bfd_multiplier() -> u8 {
    3
}
fn default_bfd_key_id() -> u8 {
    1
}

fn default_true() -> bool {
    true
}
fn default_hold_time() -> Duration {
    Duration::from_secs(90)
}
fn default_connect_retry() -> Duration {
    Duration::from_secs(1)
}
fn default_local_pref() -> u32 {
    100
}
fn default_max_prefixes() -> usize {
    1_000_000
}
fn default_bgp_port() -> u16 {
    179
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HypervisorConfig {
    pub name: String,
    pub router_id: Ipv4Addr,
    #[serde(default = "default_asn")]
    pub asn: u32,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The hypervisor's private loopback address, the preferred source of
    /// the local-out table.
    #[serde(default)]
    pub private_source_v4: Option<Ipv4Addr>,
    #[serde(default)]
    pub private_source_v6: Option<Ipv6Addr>,
}

fn default_asn() -> u32 {
    65000
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/l3hv")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Unix socket of the local control API (`l3hv status`, tests).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
        }
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/l3hv/l3hvd.sock")
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `l3hv=debug`); RUST_LOG overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::Human,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// What fills the bottom of a routing table so lookups never fall through.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DefaultRoute {
    #[default]
    Blackhole,
    Unreachable,
    None,
}

/// How IPv6 forwarding is enabled.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Ipv6Forwarding {
    /// `force_forwarding=1` on each managed interface only (kernel 6.17+).
    #[default]
    PerInterface,
    /// `all.forwarding=1` (older kernels; turns the host into a router).
    Global,
}

/// How learned ECMP routes are programmed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NexthopObjects {
    /// Nexthop objects when the kernel has them (probed at start), else
    /// RTA_MULTIPATH.
    #[default]
    Auto,
    /// Always nexthop objects and groups (routes carry RTA_NH_ID).
    On,
    /// Always RTA_MULTIPATH routes, as before nexthop objects.
    Off,
}

impl NexthopObjects {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// Route, rule and address protocol number marking what l3hv owns.
    #[serde(default = "default_protocol")]
    pub route_protocol: u8,
    /// Metric of local VM routes.
    #[serde(default = "default_vm_metric")]
    pub vm_route_metric: u32,
    /// Metric of routes learned by BGP.
    #[serde(default = "default_learned_metric")]
    pub learned_route_metric: u32,
    #[serde(default = "default_local_out_table")]
    pub local_out_table: u32,
    #[serde(default)]
    pub local_out_default: DefaultRoute,
    #[serde(default = "RulePriorities::default_v4")]
    pub rules_v4: RulePriorities,
    #[serde(default = "RulePriorities::default_v6")]
    pub rules_v6: RulePriorities,
    /// Delete the kernel's own `main` (32766) and `default` (32767) rules;
    /// the catch-all rule makes them unreachable anyway.
    #[serde(default)]
    pub remove_default_rules: bool,
    #[serde(default)]
    pub ipv6_forwarding: Ipv6Forwarding,
    /// Period of the level-based reconcile that repairs outside changes.
    #[serde(default = "default_reconcile_interval", with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Learned routes through kernel nexthop objects and groups: a fabric
    /// failure then rewrites a few groups, not every route.
    #[serde(default)]
    pub nexthop_objects: NexthopObjects,
    /// `net.ipv4.nexthop_compat_mode` to set (absent: left as it is). With
    /// 1, the kernel's default, replacing a group also notifies every
    /// route using it (77 ms at 100,000 routes here, against 3 ms with 0)
    /// and `ip route` shows the group's members; 0 makes failover cost
    /// O(groups) in the kernel too, and `ip route` shows only `nhid`.
    #[serde(default)]
    pub nexthop_compat_mode: Option<u8>,
    /// The packet sink l3hv creates (a layer-3 tun nobody opens) under the
    /// whole-subnet proxy ARP routes of `arp_whole_subnet` fabrics.
    #[serde(default = "default_sink_interface")]
    pub sink_interface: String,
}

fn default_sink_interface() -> String {
    "l3hv-sink".into()
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            route_protocol: default_protocol(),
            vm_route_metric: default_vm_metric(),
            learned_route_metric: default_learned_metric(),
            local_out_table: default_local_out_table(),
            local_out_default: DefaultRoute::Blackhole,
            rules_v4: RulePriorities::default_v4(),
            rules_v6: RulePriorities::default_v6(),
            remove_default_rules: false,
            ipv6_forwarding: Ipv6Forwarding::PerInterface,
            reconcile_interval: default_reconcile_interval(),
            nexthop_objects: NexthopObjects::Auto,
            nexthop_compat_mode: None,
            sink_interface: default_sink_interface(),
        }
    }
}

fn default_protocol() -> u8 {
    203
}
fn default_vm_metric() -> u32 {
    16
}
fn default_learned_metric() -> u32 {
    32
}
fn default_local_out_table() -> u32 {
    100
}
fn default_reconcile_interval() -> Duration {
    Duration::from_secs(60)
}

/// Policy rule priorities of one address family. `uplink` and `fabric` are
/// the first of a block: one rule per private uplink, one per private subnet.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RulePriorities {
    /// `iif lo lookup main suppress_prefixlength 0`.
    pub main: u32,
    /// `iif lo lookup local-out`.
    pub local_out: u32,
    /// `iif <uplink of a non-catch-all fabric> lookup <its table>`.
    pub uplink: u32,
    /// `from <subnet of a non-catch-all fabric> lookup <its table>`.
    pub fabric: u32,
    /// Everything else → the catch-all (public) fabric's table.
    pub catch_all: u32,
}

impl RulePriorities {
    fn default_v4() -> Self {
        Self {
            main: 21,
            local_out: 22,
            uplink: 26,
            fabric: 40,
            catch_all: 99,
        }
    }
    fn default_v6() -> Self {
        Self {
            main: 51,
            local_out: 52,
            uplink: 56,
            fabric: 70,
            catch_all: 99,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Ipv4Mode {
    /// The VM believes it is on the fabric's shared subnet; the gateway
    /// address lies inside it.
    #[default]
    SharedSubnet,
    /// The VM gets a /32 and a classless static route to 169.254.0.1.
    PointToPoint,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Ipv6Mode {
    /// A /64 routed to each VM; no neighbour proxy.
    #[default]
    PrefixPerVm,
    /// A shared /64, RAs with A=0, stateful DHCPv6, NDP proxy from the RIB.
    SharedDhcpv6,
    /// Off-link prefix (L=0): the guest sends everything to fe80::1.
    OffLink,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FabricConfig {
    /// Kernel routing table of this fabric.
    pub table: u32,
    /// The fabric that catches all traffic no other rule claims (public).
    #[serde(default)]
    pub catch_all: bool,
    /// VM subnets (IPv4 and IPv6) of this fabric.
    #[serde(default)]
    pub subnets: Vec<IpNet>,
    /// Gateway the VMs see (DHCP router option); required in shared-subnet
    /// mode, 169.254.0.1 by default in point-to-point mode.
    #[serde(default)]
    pub gateway_v4: Option<Ipv4Addr>,
    #[serde(default = "default_gateway_v6")]
    pub gateway_v6: Ipv6Addr,
    #[serde(default)]
    pub ipv4_mode: Ipv4Mode,
    #[serde(default)]
    pub ipv6_mode: Ipv6Mode,
    #[serde(default)]
    pub default_route: DefaultRoute,
    /// Shared-subnet IPv4 mode: proxy ARP answers for every address of the
    /// fabric's IPv4 subnets at once, not only for the routed ones (a
    /// catch-all route for each subnet in the fabric's table, `dev lo`, under
    /// every real route; what it catches is dropped by local-out's
    /// blackhole). Without it a VM that ARPs for an address before the
    /// address's route reaches this hypervisor gets no answer and retries
    /// only after a second (the seed's first-ping stall).
    #[serde(default = "default_true")]
    pub arp_whole_subnet: bool,
    /// `shared-dhcpv6` IPv6 mode: the same for neighbour solicitations.
    /// Linux has no proxy entry for a prefix, so l3hv answers them itself
    /// (one AF_PACKET socket per VM interface, a BPF filter passing only
    /// solicitations) for every address of the shared subnets but the VM's
    /// own; the kernel's per-address proxy entries stay as they are.
    #[serde(default = "default_true")]
    pub nd_whole_subnet: bool,
    /// `shared-dhcpv6` IPv6 mode: program a kernel NDP proxy entry
    /// (NTF_PROXY) on each VM interface for every address of the shared
    /// subnets routed elsewhere. With `nd_whole_subnet` the responder
    /// already answers for them; turning the entries off keeps the kernel
    /// state constant however many addresses the fabric has (each entry
    /// also joins a solicited-node multicast group on its interface).
    #[serde(default = "default_true")]
    pub nd_proxy_entries: bool,
    /// Path name (`a`, `b`) → uplink of this fabric on that path.
    #[serde(default)]
    pub paths: BTreeMap<String, PathConfig>,
}

fn default_gateway_v6() -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)
}

impl FabricConfig {
    /// The gateway address put on every tap of this fabric.
    pub fn effective_gateway_v4(&self) -> Ipv4Addr {
        self.gateway_v4.unwrap_or(Ipv4Addr::new(169, 254, 0, 1))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PathConfig {
    pub interface: String,
    #[serde(default)]
    pub addresses: Vec<IpNet>,
    #[serde(default)]
    pub reflectors: Vec<IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DhcpConfig {
    /// Absent: infinite lease.
    #[serde(default, with = "humantime_serde")]
    pub lease_time: Option<Duration>,
    #[serde(default)]
    pub dns_servers: Vec<Ipv4Addr>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub mtu: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RaConfig {
    #[serde(default = "default_ra_min", with = "humantime_serde")]
    pub min_interval: Duration,
    #[serde(default = "default_ra_max", with = "humantime_serde")]
    pub max_interval: Duration,
    #[serde(default = "default_router_lifetime", with = "humantime_serde")]
    pub router_lifetime: Duration,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub rdnss: Vec<Ipv6Addr>,
    #[serde(default)]
    pub dnssl: Vec<String>,
}

impl Default for RaConfig {
    fn default() -> Self {
        Self {
            min_interval: default_ra_min(),
            max_interval: default_ra_max(),
            router_lifetime: default_router_lifetime(),
            mtu: None,
            rdnss: Vec::new(),
            dnssl: Vec::new(),
        }
    }
}

fn default_ra_min() -> Duration {
    Duration::from_secs(3)
}
fn default_ra_max() -> Duration {
    Duration::from_secs(10)
}
fn default_router_lifetime() -> Duration {
    Duration::from_secs(1800)
}

/// The D-Bus API (`net.l3hv.Agent1`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DbusConfig {
    /// Serve the API; the hook then calls the agent over D-Bus, otherwise
    /// over the control socket.
    #[serde(default)]
    pub enabled: bool,
    /// `"system"`, `"session"`, or a D-Bus address (`unix:path=/run/...`).
    /// The hook reads it here because libvirt strips its environment.
    #[serde(default = "default_bus")]
    pub bus: String,
    /// Unix group whose members may call the mutating methods besides root
    /// (checked by the agent; keep it in step with the bus policy file).
    #[serde(default)]
    pub group: Option<String>,
}

impl Default for DbusConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bus: default_bus(),
            group: None,
        }
    }
}

fn default_bus() -> String {
    "system".into()
}

/// The agent's own libvirt connection (events and reconcile of domains).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_libvirt_uri")]
    pub uri: String,
    /// Longest wait between two reconnection attempts (the wait doubles
    /// from 1s up to this).
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            uri: default_libvirt_uri(),
            reconnect_max: default_reconnect_max(),
        }
    }
}

fn default_libvirt_uri() -> String {
    "qemu:///system".into()
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

// ------------------------------------------------------------- accessors --

/// One uplink: a fabric on a path.
#[derive(Debug, Clone, PartialEq)]
pub struct Uplink<'a> {
    pub fabric: &'a str,
    pub path: &'a str,
    pub config: &'a PathConfig,
    pub table: u32,
    pub catch_all: bool,
}

impl Config {
    /// Every uplink, in (fabric, path) order.
    pub fn uplinks(&self) -> Vec<Uplink<'_>> {
        self.fabrics
            .iter()
            .flat_map(|(fname, f)| {
                f.paths.iter().map(move |(pname, p)| Uplink {
                    fabric: fname,
                    path: pname,
                    config: p,
                    table: f.table,
                    catch_all: f.catch_all,
                })
            })
            .collect()
    }

    pub fn fabric(&self, name: &str) -> Option<&FabricConfig> {
        self.fabrics.get(name)
    }

    pub fn intent_path(&self) -> PathBuf {
        self.hypervisor.state_dir.join("intent.json")
    }
}

// ------------------------------------------------------------- loading --

/// Reads, decodes and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&file, &text)
}

/// Decodes and validates configuration text; `file` only names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    let invalid = |issues| ConfigError::Invalid {
        file: file.to_string(),
        issues,
    };
    let parsed = match ImDocument::parse(text.to_string()) {
        Ok(doc) => doc,
        Err(e) => {
            let (line, column) = e.span().map_or((1, 1), |s| locate::line_col(text, s.start));
            return Err(invalid(vec![ConfigIssue {
                line,
                column,
                field: String::new(),
                message: e.message().trim().to_string(),
            }]));
        }
    };
    // Decoded from the document parsed above: the text is parsed once on
    // the way to a valid configuration (it was parsed twice, most of what
    // `l3hv hook` did before its call to the agent). An error parses it
    // again, for the spans of its fields.
    let document = || ImDocument::parse(text.to_string()).ok();
    let config: Config = match toml_edit::de::from_document(parsed) {
        Ok(c) => c,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let (line, column) = locate::line_col(text, offset);
            let field = document()
                .map(|doc| locate::path_at(&doc, offset).to_string())
                .unwrap_or_default();
            return Err(invalid(vec![ConfigIssue {
                line,
                column,
                field,
                message: e.message().trim().to_string(),
            }]));
        }
    };
    let problems = validate(&config);
    if problems.is_empty() {
        return Ok(config);
    }
    let doc = document();
    Err(invalid(
        problems
            .into_iter()
            .map(|(path, message)| {
                let (line, column) = doc
                    .as_ref()
                    .and_then(|doc| locate::span_of(doc, &path))
                    .map_or((1, 1), |s| locate::line_col(text, s.start));
                ConfigIssue {
                    line,
                    column,
                    field: path.to_string(),
                    message,
                }
            })
            .collect(),
    ))
}

/// A valid Linux interface name (IFNAMSIZ - 1, no '/', no whitespace).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// Semantic checks serde cannot express; returns (path, message) pairs.
pub fn validate(c: &Config) -> Vec<(KeyPath, String)> {
    let mut out = Vec::new();
    let root = KeyPath::root();
    let mut err = |p: KeyPath, m: String| out.push((p, m));

    let hv = root.key("hypervisor");
    if c.hypervisor.name.trim().is_empty() {
        err(hv.key("name"), "must not be empty".into());
    }
    if c.hypervisor.asn == 0 || c.hypervisor.asn == 23456 {
        err(
            hv.key("asn"),
            format!("{} is not a usable AS number", c.hypervisor.asn),
        );
    }
    if !c.hypervisor.state_dir.is_absolute() {
        err(hv.key("state_dir"), "must be an absolute path".into());
    }
    if !c.control.socket.is_absolute() {
        err(
            root.key("control").key("socket"),
            "must be an absolute path".into(),
        );
    }
    let bus = c.dbus.bus.as_str();
    if bus != "system" && bus != "session" {
        // Read by the parser the agent and the hook connect with, so an
        // address they would refuse is refused here, with its line.
        if let Err(e) = bus.parse::<zbus::Address>() {
            err(
                root.key("dbus").key("bus"),
                format!("`{bus}` is neither \"system\", \"session\" nor a D-Bus address ({e})"),
            );
        }
    }
    if let Some(m) = c.kernel.nexthop_compat_mode
        && m > 1
    {
        err(
            root.key("kernel").key("nexthop_compat_mode"),
            format!("{m} is neither 0 nor 1"),
        );
    }
    let bfd = root.key("bfd");
    for (name, d) in [("min_tx", c.bfd.min_tx), ("min_rx", c.bfd.min_rx)] {
        if d < Duration::from_millis(10) || d > Duration::from_secs(60) {
            err(
                bfd.key(name),
                format!("{} is outside 10ms..60s", humantime::format_duration(d)),
            );
        }
    }
    if c.bfd.multiplier == 0 {
        err(bfd.key("multiplier"), "must be at least 1".into());
    }
    if let Some(a) = &c.bfd.auth
        && (a.key.is_empty() || a.key.len() > 20)
    {
        err(
            bfd.key("auth").key("key"),
            format!("is {} octets; keyed SHA1 keys are 1 to 20", a.key.len()),
        );
    }
    if let Some(g) = &c.dbus.group
        && (g.is_empty() || g.chars().any(|ch| ch.is_whitespace() || ch == ':'))
    {
        err(
            root.key("dbus").key("group"),
            format!("`{g}` is not a group name"),
        );
    }
    if c.libvirt.uri.is_empty() || !c.libvirt.uri.contains(':') {
        err(
            root.key("libvirt").key("uri"),
            format!("`{}` is not a libvirt URI", c.libvirt.uri),
        );
    }
    if c.libvirt.reconnect_max < Duration::from_secs(1) {
        err(
            root.key("libvirt").key("reconnect_max"),
            "must be at least 1s".into(),
        );
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&c.log.level) {
        err(
            root.key("log").key("level"),
            format!("not a log filter: {e}"),
        );
    }

    let k = root.key("kernel");
    if c.kernel.route_protocol <= 4 {
        err(
            k.key("route_protocol"),
            format!(
                "{} is reserved for the kernel (0 to 4); pick an unused number such as 203",
                c.kernel.route_protocol
            ),
        );
    }
    if c.kernel.reconcile_interval < Duration::from_secs(1) {
        err(k.key("reconcile_interval"), "must be at least 1s".into());
    }
    let reserved_table = |t: u32| t == 0 || (253..=255).contains(&t);
    if reserved_table(c.kernel.local_out_table) {
        err(
            k.key("local_out_table"),
            format!(
                "table {} is reserved by the kernel",
                c.kernel.local_out_table
            ),
        );
    }

    // Fabrics.
    let fabrics = root.key("fabrics");
    if c.fabrics.is_empty() {
        err(fabrics.clone(), "at least one fabric is required".into());
    }
    let catch_all: Vec<&String> = c
        .fabrics
        .iter()
        .filter(|(_, f)| f.catch_all)
        .map(|(n, _)| n)
        .collect();
    if catch_all.len() > 1 {
        err(
            fabrics.key(catch_all[1]).key("catch_all"),
            format!(
                "only one fabric may be the catch-all, and `{}` already is",
                catch_all[0]
            ),
        );
    } else if catch_all.is_empty() && !c.fabrics.is_empty() {
        err(
            fabrics.clone(),
            "exactly one fabric must set `catch_all = true` (the public one)".into(),
        );
    }
    let mut tables: BTreeMap<u32, String> = BTreeMap::new();
    tables.insert(c.kernel.local_out_table, "kernel.local_out_table".into());
    let mut ifnames: BTreeMap<&str, String> = BTreeMap::new();
    if valid_ifname(&c.kernel.sink_interface) {
        ifnames.insert(&c.kernel.sink_interface, "kernel.sink_interface".into());
    } else {
        err(
            root.key("kernel").key("sink_interface"),
            format!(
                "`{}` is not a valid interface name",
                c.kernel.sink_interface
            ),
        );
    }
    let mut subnets: Vec<(IpNet, String)> = Vec::new();
    for (name, f) in &c.fabrics {
        let fp = fabrics.key(name);
        if !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            err(
                fp.clone(),
                format!("fabric name `{name}` may only use letters, digits, '-' and '_'"),
            );
        }
        if reserved_table(f.table) {
            err(
                fp.key("table"),
                format!("table {} is reserved by the kernel", f.table),
            );
        } else if let Some(other) = tables.insert(f.table, format!("fabrics.{name}.table")) {
            err(
                fp.key("table"),
                format!("table {} is also used by `{other}`", f.table),
            );
        }
        for (i, net) in f.subnets.iter().enumerate() {
            if net.trunc() != *net {
                err(
                    fp.key("subnets").index(i),
                    format!("{net} has host bits set; did you mean {}?", net.trunc()),
                );
            }
            for (other, owner) in &subnets {
                if other.contains(&net.network()) || net.contains(&other.network()) {
                    err(
                        fp.key("subnets").index(i),
                        format!("{net} overlaps {other} of `{owner}`"),
                    );
                }
            }
            subnets.push((*net, format!("fabrics.{name}.subnets")));
        }
        match (f.ipv4_mode, f.gateway_v4) {
            (Ipv4Mode::SharedSubnet, None) if f.subnets.iter().any(|n| n.addr().is_ipv4()) => err(
                fp.key("gateway_v4"),
                "required with ipv4_mode = \"shared-subnet\" (the address VMs use as router)"
                    .into(),
            ),
            (Ipv4Mode::SharedSubnet, Some(gw))
                if !f.subnets.iter().any(|n| n.contains(&IpAddr::V4(gw))) =>
            {
                err(
                    fp.key("gateway_v4"),
                    format!("{gw} is not inside any IPv4 subnet of this fabric"),
                );
            }
            _ => {}
        }
        if f.gateway_v6.segments()[0] & 0xffc0 != 0xfe80 {
            err(
                fp.key("gateway_v6"),
                format!("{} must be a link-local address (fe80::/10)", f.gateway_v6),
            );
        }
        for (pname, p) in &f.paths {
            let pp = fp.key("paths").key(pname);
            if !valid_ifname(&p.interface) {
                err(
                    pp.key("interface"),
                    format!("`{}` is not a valid interface name", p.interface),
                );
            } else if let Some(other) =
                ifnames.insert(&p.interface, format!("fabrics.{name}.paths.{pname}"))
            {
                err(
                    pp.key("interface"),
                    format!(
                        "interface `{}` is also the uplink of `{other}`",
                        p.interface
                    ),
                );
            }
            for (i, r) in p.reflectors.iter().enumerate() {
                if !p.addresses.iter().any(|a| a.contains(r)) {
                    err(
                        pp.key("reflectors").index(i),
                        format!("{r} is not on any subnet of this uplink's addresses"),
                    );
                }
            }
        }
    }

    // Rule priorities: ordered blocks that must not overlap.
    let private_uplinks = c.uplinks().iter().filter(|u| !u.catch_all).count() as u32;
    for (key, prio, family) in [
        ("rules_v4", c.kernel.rules_v4, true),
        ("rules_v6", c.kernel.rules_v6, false),
    ] {
        let private_subnets = c
            .fabrics
            .values()
            .filter(|f| !f.catch_all)
            .flat_map(|f| &f.subnets)
            .filter(|n| n.addr().is_ipv4() == family)
            .count() as u32;
        let rp = k.key(key);
        let blocks = [
            ("main", prio.main, 1),
            ("local_out", prio.local_out, 1),
            ("uplink", prio.uplink, private_uplinks.max(1)),
            ("fabric", prio.fabric, private_subnets.max(1)),
            ("catch_all", prio.catch_all, 1),
        ];
        for w in blocks.windows(2) {
            let (an, a, alen) = w[0];
            let (bn, b, _) = w[1];
            if a + alen > b {
                err(
                    rp.key(bn),
                    format!(
                        "priority {b} must be above {an}'s block {a}..{} (rules are evaluated in order)",
                        a + alen - 1
                    ),
                );
            }
        }
        if prio.main == 0 {
            err(
                rp.key("main"),
                "priority 0 belongs to the local table".into(),
            );
        }
        if prio.catch_all >= 32766 {
            err(
                rp.key("catch_all"),
                "must be below 32766, the kernel's main rule".into(),
            );
        }
    }

    // BGP.
    let b = root.key("bgp");
    let hold = c.bgp.hold_time.as_secs();
    if c.bgp.hold_time.subsec_nanos() != 0 || (hold != 0 && hold < 3) || hold > 65535 {
        err(
            b.key("hold_time"),
            "must be 0 or whole seconds between 3s and 65535s (RFC 4271 §4.2)".into(),
        );
    }
    if c.bgp.connect_retry < Duration::from_millis(100)
        || c.bgp.connect_retry > Duration::from_secs(60)
    {
        err(
            b.key("connect_retry"),
            "must be between 100ms and 60s".into(),
        );
    }
    if let Some(p) = &c.bgp.password {
        if p.is_empty() || p.len() > 80 {
            err(
                b.key("password"),
                "must be 1 to 80 bytes (TCP_MD5SIG_MAXKEYLEN)".into(),
            );
        }
    }
    if let Some(gr) = c.bgp.graceful_restart {
        if gr.as_secs() > 4095 {
            err(
                b.key("graceful_restart"),
                "must be at most 4095s (RFC 4724 §3)".into(),
            );
        }
    }
    for u in c.uplinks() {
        for (i, r) in u.config.reflectors.iter().enumerate() {
            if !u
                .config
                .addresses
                .iter()
                .any(|a| a.addr().is_ipv4() == r.is_ipv4())
            {
                err(
                    fabrics
                        .key(u.fabric)
                        .key("paths")
                        .key(u.path)
                        .key("reflectors")
                        .index(i),
                    format!("{r}: the uplink has no address of this family to speak BGP from"),
                );
            }
        }
    }

    // Metrics.
    if let Some(addr) = c.metrics.listen {
        if addr.port() == 0 {
            err(
                root.key("metrics").key("listen"),
                format!("{addr}: name a port (such as 9475)"),
            );
        }
    }

    // DHCP / RA.
    if let Some(lt) = c.dhcp.lease_time {
        if lt < Duration::from_secs(60) || lt.as_secs() >= u64::from(u32::MAX) {
            err(
                root.key("dhcp").key("lease_time"),
                "must be between 60s and 136 years; omit it for an infinite lease".into(),
            );
        }
    }
    let ra = root.key("ra");
    if c.ra.min_interval >= c.ra.max_interval {
        err(ra.key("min_interval"), "must be below max_interval".into());
    }
    if c.ra.max_interval < Duration::from_secs(4) || c.ra.max_interval > Duration::from_secs(1800) {
        err(
            ra.key("max_interval"),
            "must be between 4s and 1800s (RFC 4861 §6.2.1)".into(),
        );
    }
    if c.ra.router_lifetime > Duration::from_secs(9000) {
        err(
            ra.key("router_lifetime"),
            "must be at most 9000s (RFC 4861 §6.2.1)".into(),
        );
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = include_str!("../../packaging/l3hv.toml");

    #[test]
    fn shipped_example_is_valid() {
        let c = parse("l3hv.toml", EXAMPLE).unwrap();
        assert_eq!(c.fabrics["public"].table, 90);
        assert_eq!(c.uplinks().len(), 4);
        assert_eq!(c.kernel.nexthop_objects, NexthopObjects::Auto);
    }

    #[test]
    fn nexthop_objects_takes_auto_on_off_only() {
        for (text, want) in [
            ("off", NexthopObjects::Off),
            ("on", NexthopObjects::On),
            ("auto", NexthopObjects::Auto),
        ] {
            let file = EXAMPLE.replace(
                "nexthop_objects = \"auto\"",
                &format!("nexthop_objects = \"{text}\""),
            );
            assert_eq!(
                parse("l3hv.toml", &file).unwrap().kernel.nexthop_objects,
                want
            );
        }
        let bad = EXAMPLE.replace("nexthop_objects = \"auto\"", "nexthop_objects = \"yes\"");
        assert!(parse("l3hv.toml", &bad).is_err());
    }

    fn issues(text: &str) -> Vec<ConfigIssue> {
        match parse("t.toml", text) {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    /// The smallest valid configuration (one catch-all fabric), for tests
    /// of other modules too.
    pub(crate) const MIN: &str = r#"
[hypervisor]
name = "hv1"
router_id = "198.51.100.101"

[fabrics.public]
table = 90
catch_all = true
subnets = ["203.0.113.0/24"]
gateway_v4 = "203.0.113.254"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("t.toml", MIN).unwrap();
        assert_eq!(c.hypervisor.asn, 65000);
        assert_eq!(c.kernel.route_protocol, 203);
        assert_eq!(c.kernel.local_out_table, 100);
    }

    #[test]
    fn syntax_error_has_line() {
        let i = issues("[hypervisor\nname = 1");
        assert_eq!(i[0].line, 1);
    }

    #[test]
    fn unknown_field_is_named() {
        let text = MIN.replace("table = 90", "table = 90\ntabel = 91");
        let i = issues(&text);
        assert!(i[0].message.contains("tabel"), "{i:?}");
        assert_eq!(i[0].line, 8);
    }

    #[test]
    fn wrong_type_names_field_and_line() {
        let text = MIN.replace("table = 90", "table = \"ninety\"");
        let i = issues(&text);
        assert_eq!(i[0].field, "fabrics.public.table");
        assert_eq!(i[0].line, 7);
    }

    #[test]
    fn bad_address_names_field() {
        let text = MIN.replace("198.51.100.101", "198.51.100.300");
        let i = issues(&text);
        assert_eq!(i[0].field, "hypervisor.router_id");
        assert_eq!(i[0].line, 4);
    }

    #[test]
    fn semantic_errors_are_located() {
        let text = MIN.replace(
            "gateway_v4 = \"203.0.113.254\"",
            "gateway_v4 = \"192.0.2.1\"",
        );
        let i = issues(&text);
        assert_eq!(i[0].field, "fabrics.public.gateway_v4");
        assert_eq!(i[0].line, 10);
        assert!(i[0].message.contains("not inside"));
    }

    #[test]
    fn duplicate_table_and_two_catch_alls() {
        let text = format!(
            "{MIN}\n[fabrics.private]\ntable = 90\ncatch_all = true\nsubnets = [\"172.22.0.0/24\"]\ngateway_v4 = \"172.22.0.254\"\n"
        );
        let i = issues(&text);
        let fields: Vec<&str> = i.iter().map(|i| i.field.as_str()).collect();
        assert!(
            fields.contains(&"fabrics.public.catch_all")
                || fields.contains(&"fabrics.private.catch_all"),
            "{i:?}"
        );
        assert!(fields.iter().any(|f| f.ends_with(".table")), "{i:?}");
    }

    #[test]
    fn metrics_off_by_default_and_checked() {
        assert_eq!(parse("t.toml", MIN).unwrap().metrics.listen, None);
        let ok = format!("{MIN}\n[metrics]\nlisten = \"127.0.0.1:9475\"\n");
        assert_eq!(
            parse("t.toml", &ok).unwrap().metrics.listen,
            Some("127.0.0.1:9475".parse().unwrap())
        );
        let i = issues(&format!("{MIN}\n[metrics]\nlisten = \"127.0.0.1\"\n"));
        assert_eq!(i[0].field, "metrics.listen");
        assert_eq!(i[0].line, 13);
        let i = issues(&format!("{MIN}\n[metrics]\nlisten = \"[::1]:0\"\n"));
        assert_eq!(i[0].field, "metrics.listen");
    }

    #[test]
    fn dbus_and_libvirt_defaults_and_checks() {
        let c = parse("t.toml", MIN).unwrap();
        assert!(!c.dbus.enabled);
        assert_eq!(c.dbus.bus, "system");
        assert!(!c.libvirt.enabled);
        assert_eq!(c.libvirt.uri, "qemu:///system");
        let text = format!("{MIN}\n[dbus]\nenabled = true\nbus = \"sytem\"\n");
        let i = issues(&text);
        assert_eq!(i[0].field, "dbus.bus");
        assert_eq!(i[0].line, 14);
        // Addresses as the bus's own parser reads them: an unknown
        // transport, a unix address without its path.
        for bad in ["foo:bar=1", "unix:nope=1"] {
            let text = format!("{MIN}\n[dbus]\nbus = \"{bad}\"\n");
            let i = issues(&text);
            assert_eq!(i[0].field, "dbus.bus", "{bad}");
            assert!(i[0].message.contains(bad), "{}", i[0].message);
        }
        for good in ["unix:abstract=l3hv-test", "tcp:host=127.0.0.1,port=4000"] {
            let text = format!("{MIN}\n[dbus]\nbus = \"{good}\"\n");
            let c = parse("t.toml", &text).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(c.dbus.bus, good);
        }
        let text = format!("{MIN}\n[libvirt]\nuri = \"nope\"\n");
        assert_eq!(issues(&text)[0].field, "libvirt.uri");
        let text = format!("{MIN}\n[dbus]\nbus = \"unix:path=/tmp/bus\"\ngroup = \"l3hv\"\n");
        let c = parse("t.toml", &text).unwrap();
        assert_eq!(c.dbus.group.as_deref(), Some("l3hv"));
    }

    #[test]
    fn sink_interface_must_be_a_free_valid_name() {
        let i = issues(&format!("{MIN}\n[kernel]\nsink_interface = \"a/b\"\n"));
        assert_eq!(i[0].field, "kernel.sink_interface");
        let ok = parse("t.toml", MIN).unwrap();
        assert_eq!(ok.kernel.sink_interface, "l3hv-sink");
        assert!(ok.fabrics.values().all(|f| f.arp_whole_subnet));
    }

    #[test]
    fn nexthop_compat_mode_is_0_or_1() {
        let i = issues(&format!("{MIN}\n[kernel]\nnexthop_compat_mode = 2\n"));
        assert_eq!(i[0].field, "kernel.nexthop_compat_mode");
        let ok = format!("{MIN}\n[kernel]\nnexthop_compat_mode = 0\n");
        assert_eq!(
            parse("t.toml", &ok).unwrap().kernel.nexthop_compat_mode,
            Some(0)
        );
    }

    #[test]
    fn bfd_defaults_are_the_seeds_and_errors_are_located() {
        let c = parse("t.toml", MIN).unwrap();
        assert!(c.bfd.enabled);
        assert_eq!(c.bfd.min_tx, Duration::from_millis(500));
        assert_eq!(c.bfd.multiplier, 3);
        assert!(c.bfd.auth.is_none());
        let i = issues(&format!("{MIN}\n[bfd]\nmin_rx = \"5ms\"\n"));
        assert_eq!((i[0].field.as_str(), i[0].line), ("bfd.min_rx", 13));
        let i = issues(&format!("{MIN}\n[bfd]\nmultiplier = 0\n"));
        assert_eq!(i[0].field, "bfd.multiplier");
        let i = issues(&format!(
            "{MIN}\n[bfd.auth]\ntype = \"keyed-sha1\"\nkey = \"{}\"\n",
            "x".repeat(21)
        ));
        assert_eq!((i[0].field.as_str(), i[0].line), ("bfd.auth.key", 14));
        let i = issues(&format!("{MIN}\n[bfd.auth]\ntype = \"md5\"\nkey = \"k\"\n"));
        assert_eq!(i[0].field, "bfd.auth.type");
        let ok = format!(
            "{MIN}\n[bfd]\nmin_tx = \"50ms\"\n[bfd.auth]\ntype = \"meticulous-keyed-sha1\"\nkey = \"k\"\n"
        );
        let c = parse("t.toml", &ok).unwrap();
        assert_eq!(c.bfd.auth.unwrap().key_id, 1);
    }

    #[test]
    fn display_names_file_line_field() {
        let text = MIN.replace("table = 90", "table = 254");
        let e = parse("/etc/l3hv/l3hv.toml", &text).unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/l3hv/l3hv.toml:7:9: field `fabrics.public.table`: "),
            "{e}"
        );
    }
}
