//! gen-docs: writes the man pages and shell completions the Debian package
//! ships, from the clap definitions of `l3hvd` and `l3hv` (clap_mangen,
//! clap_complete) and the commented example configuration, which the unit
//! tests hold to the config schema (`deny_unknown_fields`). Run by
//! `packaging/build-deb`; not installed.
//!
//! ```text
//! gen-docs OUT_DIR  →  OUT_DIR/man/{l3hvd.8,l3hv.8,l3hv.toml.5}
//!                      OUT_DIR/completions/{bash,zsh,fish}/...
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

// The binaries' own argument definitions, compiled in here unchanged.
#[allow(dead_code, clippy::all)]
#[path = "l3hvd.rs"]
mod l3hvd_bin;

#[allow(dead_code, clippy::all)]
#[path = "l3hv.rs"]
mod l3hv_bin;

const EXAMPLE: &str = include_str!("../../packaging/l3hv.toml");
const MANUAL: &str = "l3hv manual";

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: gen-docs OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen-docs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    fs::create_dir_all(&man)?;
    let version = env!("CARGO_PKG_VERSION");
    let daemon = l3hvd_bin::Args::command()
        .name("l3hvd")
        .long_about(
            "l3hvd turns this KVM/libvirt hypervisor into an L3 router for its VMs: it \
             programs VM host routes, policy rules and sysctls over netlink, speaks BGP to the \
             route reflectors of each fabric path and keeps the kernel reconciled with the \
             persisted intent. Under systemd (l3hvd.service, Type=notify) it reports READY=1 \
             after its first reconcile, pings the watchdog from its main loop, and reloads its \
             configuration on SIGHUP (systemctl reload l3hvd): a bad file is refused and the \
             running one kept. Stopping it leaves the kernel state of running VMs in place.",
        )
        .after_help("See l3hv.toml(5) for the configuration and l3hv(8) for the CLI.");
    let cli = l3hv_bin::Args::command().name("l3hv");
    for (cmd, section) in [(daemon.clone(), "8"), (cli.clone(), "8")] {
        let name = cmd.get_name().to_string();
        let page = clap_mangen::Man::new(cmd)
            .section(section)
            .manual(MANUAL)
            .source(format!("l3hv {version}"));
        let mut buf = Vec::new();
        page.render(&mut buf)?;
        fs::write(man.join(format!("{name}.{section}")), buf)?;
    }
    fs::write(man.join("l3hv.toml.5"), config_man(EXAMPLE, version))?;

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let dir = out.join("completions").join(shell.to_string());
        fs::create_dir_all(&dir)?;
        for cmd in [&daemon, &cli] {
            let mut cmd = cmd.clone();
            let name = cmd.get_name().to_string();
            clap_complete::generate_to(shell, &mut cmd, &name, &dir)?;
        }
    }
    Ok(())
}

/// roff-escapes one line of text.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// l3hv.toml(5) from the commented example: each `[table]` becomes a
/// subsection, each key (or commented-out `# key = value`, an optional
/// setting) an entry described by the comment lines above it.
fn config_man(example: &str, version: &str) -> String {
    let mut out = format!(
        ".TH L3HV.TOML 5 \"\" \"l3hv {version}\" \"{MANUAL}\"\n\
         .SH NAME\nl3hv.toml \\- configuration of the l3hv agent\n\
         .SH SYNOPSIS\n/etc/l3hv/l3hv.toml\n\
         .SH DESCRIPTION\n\
         The configuration of \\fBl3hvd\\fR(8) and \\fBl3hv\\fR(8), in TOML. Unknown keys are \
         errors; every error names the file, line, column and field. Check a file with \
         \\fBl3hvd \\-\\-check\\-config\\fR \\fIFILE\\fR. What follows is the shipped example, \
         annotated: every key shows its example value; keys left out take their defaults.\n"
    );
    let mut pending: Vec<String> = Vec::new();
    let mut in_header = true;
    let flush = |out: &mut String, pending: &mut Vec<String>| {
        if !pending.is_empty() {
            out.push_str(".PP\n");
            for p in pending.drain(..) {
                out.push_str(&roff(&p));
                out.push('\n');
            }
        }
    };
    for line in example.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            flush(&mut out, &mut pending);
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            let comment = comment.trim();
            if let Some((key, value)) = as_setting(comment) {
                in_header = false;
                entry(&mut out, &mut pending, key, value, true);
            } else {
                pending.push(comment.to_string());
            }
            continue;
        }
        if in_header {
            flush(&mut out, &mut pending);
            in_header = false;
        }
        if trimmed.starts_with('[') {
            flush(&mut out, &mut pending);
            out.push_str(&format!(".SS {}\n", roff(trimmed)));
            continue;
        }
        if let Some((key, value)) = as_setting(trimmed) {
            entry(&mut out, &mut pending, key, value, false);
        }
    }
    flush(&mut out, &mut pending);
    out.push_str(
        ".SH RELOADING\n\
         \\fBsystemctl reload l3hvd\\fR (SIGHUP) re\\-reads the file. A file that does not \
         validate is refused and the running configuration kept. Of a valid one, the fabrics, \
         the [kernel] settings but route_protocol, [dhcp], [ra] and log.level apply live; \
         the BGP settings and sessions, route_protocol, state_dir, the control socket, the \
         metrics address and log.format need \\fBsystemctl restart l3hvd\\fR, and the log says \
         which were kept.\n\
         .SH FILES\n/etc/l3hv/l3hv.toml, /var/lib/l3hv/intent.json, /run/l3hv/l3hvd.sock\n\
         .SH SEE ALSO\n\\fBl3hvd\\fR(8), \\fBl3hv\\fR(8)\n",
    );
    out
}

/// `key = value` (a bare TOML key, not prose).
fn as_setting(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once(" = ")?;
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    bare.then_some((key, value))
}

fn entry(out: &mut String, pending: &mut Vec<String>, key: &str, value: &str, optional: bool) {
    out.push_str(".TP\n");
    out.push_str(&format!("\\fB{}\\fR = {}", roff(key), roff(value)));
    if optional {
        out.push_str(" (optional; not set by default)");
    }
    out.push('\n');
    let text: Vec<String> = pending.drain(..).map(|p| roff(&p)).collect();
    if !text.is_empty() {
        out.push_str(&text.join("\n"));
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_page_lists_every_key() {
        let page = config_man(EXAMPLE, "0");
        assert!(page.contains(".SS [metrics]"));
        assert!(page.contains("\\fBlisten\\fR = \"127.0.0.1:9475\" (optional"));
        assert!(page.contains("\\fBroute_protocol\\fR = 203"));
        assert!(
            !page
                .lines()
                .any(|l| l.starts_with('.') && l.contains(" = ") && !l.starts_with(".SS"))
        );
    }
}
