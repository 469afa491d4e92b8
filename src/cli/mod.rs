//! Rendering for the operator CLI: status as a table (or JSON as is).
//! Works on the JSON the agent returns, so the CLI needs no agent types.

use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `l3hv status` as text.
pub fn render_status(v: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "hypervisor {}  l3hvd {}  up {}s  {} VMs  {} routes programmed, {} failed\n",
        s(&v["hypervisor"]),
        s(&v["version"]),
        s(&v["uptime_seconds"]),
        s(&v["vms"]),
        s(&v["routes_programmed"]),
        s(&v["routes_failed"]),
    ));
    let nh = &v["nexthops"];
    if !nh.is_null() {
        out.push_str(&format!(
            "learned routes: {} (nexthop_objects = {}), {} objects, {} groups, {} origins on an object alone\n",
            s(&nh["mode"]),
            s(&nh["setting"]),
            s(&nh["objects"]),
            s(&nh["groups"]),
            s(&nh["direct"]),
        ));
        out.push_str(&format!(
            "failovers: {} ({} objects deleted, {} groups replaced)\n",
            s(&nh["failovers"]),
            s(&nh["failover_objects_deleted"]),
            s(&nh["failover_groups_replaced"]),
        ));
    }
    let r = &v["last_reconcile"];
    if r.is_null() {
        out.push_str("last reconcile: never\n");
    } else {
        out.push_str(&format!(
            "last reconcile: {} took {} ms, {} changes planned, {} applied, {} failed{}\n",
            ago(r["at_unix"].as_u64(), now_unix()),
            s(&r["duration_ms"]),
            s(&r["planned"]),
            s(&r["applied"]),
            r["failed"].as_array().map_or(0, |a| a.len()),
            r["error"]
                .as_str()
                .map(|e| format!(", error: {e}"))
                .unwrap_or_default(),
        ));
        for c in r["conflicts"].as_array().into_iter().flatten() {
            out.push_str(&format!("  conflict: {}\n", s(c)));
        }
    }
    for p in v["peers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "bgp {} -> {}: {} ({} received, {} advertised){}\n",
            s(&p["peer"]["name"]),
            s(&p["peer"]["remote"]),
            s(&p["state"]),
            s(&p["prefixes_received"]),
            s(&p["prefixes_advertised"]),
            p["bfd"]["state"]
                .as_str()
                .map(|b| format!(", bfd {b}"))
                .unwrap_or_default(),
        ));
    }
    for u in v["uplinks"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "uplink {}/{}: {} {}\n",
            s(&u["fabric"]),
            s(&u["path"]),
            s(&u["interface"]),
            if u["present"] == true {
                "present"
            } else {
                "MISSING"
            },
        ));
    }
    out.push_str(&format!(
        "\n{:<16} {:<15} {:<18} {:<9} {:<7} {:<6} {}\n",
        "VM", "INTERFACE", "MAC", "FABRIC", "LINK", "ROUTES", "ADDRESSES"
    ));
    for i in v["interfaces"].as_array().into_iter().flatten() {
        let routes = i["routes"].as_array().cloned().unwrap_or_default();
        let ok = routes.iter().filter(|r| r["state"] == "installed").count();
        let addrs: Vec<String> = i["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        out.push_str(&format!(
            "{:<16} {:<15} {:<18} {:<9} {:<7} {:<6} {}\n",
            s(&i["vm"]),
            s(&i["name"]),
            s(&i["mac"]),
            s(&i["fabric"]),
            if i["present"] == true { "up" } else { "absent" },
            format!("{ok}/{}", routes.len()),
            addrs.join(" "),
        ));
        for r in &routes {
            out.push_str(&format!(
                "    table {:<5} {:<28} {:<24} {}\n",
                s(&r["table"]),
                s(&r["dst"]),
                r["via"]
                    .as_str()
                    .map(|v| format!("via {v}"))
                    .unwrap_or_default(),
                s(&r["state"]),
            ));
        }
        for e in i["errors"].as_array().into_iter().flatten() {
            out.push_str(&format!("    error: {}\n", s(e)));
        }
    }
    let services = v["services"]["interfaces"].as_array();
    if services.is_some_and(|a| !a.is_empty()) {
        out.push_str(&format!(
            "\n{:<15} {:<11} {:<12} {:<9} {:<9} {:<9} {}\n",
            "INTERFACE", "DHCP SERVED", "LAST LEASE", "RA SENT", "RS ANSW", "NS ANSW", "DROPPED"
        ));
    }
    for i in services.into_iter().flatten() {
        let dropped: Vec<String> = i["dropped"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        out.push_str(&format!(
            "{:<15} {:<11} {:<12} {:<9} {:<9} {:<9} {}\n",
            s(&i["interface"]),
            s(&i["dhcp_served"]),
            ago(i["dhcp_last_lease_unix"].as_u64(), now_unix()),
            s(&i["ra_sent"]),
            s(&i["rs_answered"]),
            s(&i["nd_answered"]),
            if dropped.is_empty() {
                "-".to_string()
            } else {
                dropped.join(" ")
            },
        ));
    }
    out
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// PURE: a Unix time as an age for a table cell ("-" when absent).
pub fn ago(unix: Option<u64>, now: u64) -> String {
    let Some(t) = unix else {
        return "-".into();
    };
    let d = now.saturating_sub(t);
    match d {
        0..=119 => format!("{d}s ago"),
        120..=7199 => format!("{}m ago", d / 60),
        7200..=172_799 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

/// `l3hv routes` as text: one block per prefix, its paths (`*` selected)
/// and its kernel routes.
pub fn render_routes(v: &Value) -> String {
    let mut out = String::new();
    for r in v.as_array().into_iter().flatten() {
        out.push_str(&format!("{} {}\n", s(&r["fabric"]), s(&r["prefix"])));
        for p in r["paths"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {} via {} dev {}  session {}{}  originator {}  local-pref {}\n",
                if p["selected"] == true { "*" } else { " " },
                s(&p["next_hop"]),
                s(&p["uplink"]),
                s(&p["session"]),
                p["path_id"]
                    .as_u64()
                    .map(|i| format!(" path-id {i}"))
                    .unwrap_or_default(),
                s(&p["originator"]),
                s(&p["local_pref"]),
            ));
        }
        for k in r["kernel"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  table {} metric {}{}: {}\n",
                s(&k["table"]),
                s(&k["metric"]),
                k["nh_id"]
                    .as_u64()
                    .map(|i| format!(" nhid {i}"))
                    .unwrap_or_default(),
                s(&k["state"]),
            ));
        }
    }
    out
}

/// `l3hv peers` as text.
pub fn render_peers(v: &Value) -> String {
    let mut out = format!(
        "{:<34} {:<16} {:<12} {:>8} {:>8} {:>8}  {}\n",
        "SESSION", "REMOTE", "STATE", "RECV", "ADV", "REFUSED", "LAST ERROR"
    );
    for p in v.as_array().into_iter().flatten() {
        let refused: u64 = p["counters"]["refused"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        out.push_str(&format!(
            "{:<34} {:<16} {:<12} {:>8} {:>8} {:>8}  {}\n",
            s(&p["peer"]["name"]),
            s(&p["peer"]["remote"]),
            s(&p["state"]),
            s(&p["prefixes_received"]),
            s(&p["prefixes_advertised"]),
            refused,
            p["last_error"].as_str().unwrap_or(""),
        ));
        if let Some(n) = p["negotiated"].as_object() {
            out.push_str(&format!(
                "    hold {}s keepalive {}s, remote id {}, ipv4 {} ipv6 {}, add-path rx {} tx {}\n",
                n["hold_time"]["secs"],
                n["keepalive"]["secs"],
                s(&n["remote_id"]),
                n["ipv4"],
                n["ipv6"],
                n["add_path_rx"],
                n["add_path_tx"],
            ));
        }
        let b = &p["bfd"];
        if b.is_object() {
            let dropped: u64 = b["dropped"]
                .as_object()
                .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
            out.push_str(&format!(
                "    bfd {} (diag {}, remote {}), tx {} ms, detect {} ms, discr {}/{}, up {} failures {}, in {} out {} dropped {}{}\n",
                s(&b["state"]),
                s(&b["diag"]),
                s(&b["remote_state"]),
                b["tx_interval_ms"].as_f64().map_or("-".into(), |v| format!("{v:.0}")),
                b["detection_time_ms"].as_f64().map_or("-".into(), |v| format!("{v:.0}")),
                s(&b["local_discriminator"]),
                s(&b["remote_discriminator"]),
                s(&b["up_transitions"]),
                s(&b["failures"]),
                s(&b["packets_in"]),
                s(&b["packets_out"]),
                dropped,
                if b["resumed"] == true { ", resumed" } else { "" },
            ));
        }
    }
    out
}

/// `l3hv vm list` as text.
pub fn render_vms(v: &Value) -> String {
    let mut out = format!(
        "{:<16} {:<15} {:<18} {:<9} {}\n",
        "VM", "INTERFACE", "MAC", "FABRIC", "ADDRESSES"
    );
    for vm in v.as_array().into_iter().flatten() {
        for i in vm["interfaces"].as_array().into_iter().flatten() {
            let mut addrs: Vec<String> = Vec::new();
            for key in ["ipv4", "ipv6", "ipv6_prefixes"] {
                addrs.extend(i[key].as_array().into_iter().flatten().map(s));
            }
            for r in i["routed"].as_array().into_iter().flatten() {
                addrs.push(format!("{} via {}", s(&r["prefix"]), s(&r["via"])));
            }
            out.push_str(&format!(
                "{:<16} {:<15} {:<18} {:<9} {}\n",
                s(&vm["name"]),
                s(&i["name"]),
                s(&i["mac"]),
                s(&i["fabric"]),
                addrs.join(", ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn lease_ages_read_as_ages() {
        assert_eq!(ago(None, 100), "-");
        assert_eq!(ago(Some(100), 112), "12s ago");
        assert_eq!(ago(Some(0), 600), "10m ago");
        assert_eq!(ago(Some(0), 3 * 3600), "3h ago");
        assert_eq!(ago(Some(0), 5 * 86_400), "5d ago");
        assert_eq!(ago(Some(200), 100), "0s ago", "clock skew");
    }

    use super::*;

    #[test]
    fn renders_without_panicking_on_odd_input() {
        assert!(render_status(&Value::Null).contains("never"));
        let v = serde_json::json!({"interfaces": [{"name": "tap1", "routes": [{"state": "installed"}]}]});
        assert!(render_status(&v).contains("1/1"));
        assert!(render_vms(&serde_json::json!([{"name": 3}])).contains("VM"));
    }
}
