//! PURE: what a configuration reload may change while the agent runs.
//!
//! `merge(running, new)` returns the configuration the agent switches to
//! and a note for every setting it kept from the running one because only
//! a restart can change it. Called by the agent on `Command::Reload`; the
//! file was parsed and validated before, by `config::load`.
//!
//! Live: the fabrics (tables, subnets, gateways, modes, uplink names and
//! addresses as far as the kernel layout goes), the `[kernel]` settings
//! other than the route protocol, DHCP/RA settings, the log level (set by
//! `l3hvd` itself). Restart only: the route protocol (it is what marks the
//! routes the agent owns: changing it live would orphan them), the state
//! directory and control socket, the log format, the metrics address,
//! whether BGP runs at all and its listening port.
//! Live too: `[bgp]` (but `enabled` and `port`), `[bfd]`, the router id,
//! AS and the set of sessions: the speaker restarts only the sessions
//! whose configuration changed.

use crate::config::Config;

/// The configuration to run with, and what was kept from `running`.
pub fn merge(running: &Config, mut new: Config) -> (Config, Vec<String>) {
    let mut notes = Vec::new();
    let mut keep = |what: &str, changed: bool| {
        if changed {
            notes.push(format!("{what} changed: restart l3hvd to apply it"));
        }
    };
    keep(
        "kernel.route_protocol",
        running.kernel.route_protocol != new.kernel.route_protocol,
    );
    new.kernel.route_protocol = running.kernel.route_protocol;
    keep(
        "hypervisor.state_dir",
        running.hypervisor.state_dir != new.hypervisor.state_dir,
    );
    new.hypervisor.state_dir = running.hypervisor.state_dir.clone();
    keep(
        "control.socket",
        running.control.socket != new.control.socket,
    );
    new.control = running.control.clone();
    keep("log.format", running.log.format != new.log.format);
    new.log.format = running.log.format;
    keep("metrics.listen", running.metrics != new.metrics);
    new.metrics = running.metrics.clone();
    // BGP and BFD follow the new file: the speaker restarts only the
    // sessions whose configuration changed (bgp::Manager).
    if running.bgp.enabled != new.bgp.enabled {
        keep("bgp.enabled", true);
        new.bgp.enabled = running.bgp.enabled;
    }
    if running.bgp.port != new.bgp.port {
        keep("bgp.port", true);
        new.bgp.port = running.bgp.port;
    }
    (new, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Config {
        crate::config::parse("l3hv.toml", include_str!("../../packaging/l3hv.toml")).unwrap()
    }

    #[test]
    fn same_file_changes_nothing() {
        let (c, notes) = merge(&example(), example());
        assert_eq!(c, example());
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn live_settings_pass_restart_settings_are_kept() {
        let mut new = example();
        new.kernel.reconcile_interval = std::time::Duration::from_secs(5);
        new.kernel.route_protocol = 99;
        new.bgp.hold_time = std::time::Duration::from_secs(9);
        let (c, notes) = merge(&example(), new);
        assert_eq!(c.kernel.reconcile_interval.as_secs(), 5);
        assert_eq!(c.kernel.route_protocol, 203);
        assert_eq!(c.bgp.hold_time.as_secs(), 9, "BGP settings are live");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("route_protocol"));
    }

    #[test]
    fn sessions_change_live_but_not_the_port() {
        let mut new = example();
        let p = new.fabrics.get_mut("public").unwrap();
        p.paths.get_mut("a").unwrap().reflectors.clear();
        let (_, notes) = merge(&example(), new.clone());
        assert!(notes.is_empty(), "{notes:?}");
        new.bgp.port = 1179;
        let (c, notes) = merge(&example(), new);
        assert_eq!(c.bgp.port, 179);
        assert_eq!(notes.len(), 1, "{notes:?}");
    }
}
