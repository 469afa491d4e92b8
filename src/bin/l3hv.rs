//! l3hv: the operator CLI. Finds the agent from the configuration file and
//! talks to it over the control socket; no logic of its own.

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use l3hv::control::{self, Request, Response};
use l3hv::{cli, config, intent::VmIntent};

#[derive(Parser)]
#[command(version, about = "l3hv operator CLI")]
pub struct Args {
    /// Configuration file (tells where the agent's socket is).
    #[arg(long, short, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Talk to this control socket instead of the configured one.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Seconds to wait for the agent.
    #[arg(long, global = true, default_value_t = TIMEOUT)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Interfaces, addresses, routes programmed, last reconcile.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// VM intent.
    Vm {
        #[command(subcommand)]
        command: VmCmd,
    },
    /// BGP sessions: state, negotiated capabilities, counters, last error.
    Peers {
        #[arg(long)]
        json: bool,
    },
    /// Learned routes: the RIB's paths per prefix, the selected ECMP set,
    /// and each route's kernel state (installed, pending, failed, shadowed).
    Routes {
        /// Only this prefix and what it contains (or is contained in).
        prefix: Option<ipnet::IpNet>,
        #[arg(long)]
        json: bool,
    },
    /// Reconcile the kernel now and print the report.
    Reconcile {
        #[arg(long)]
        json: bool,
    },
    /// libvirt's qemu hook: `l3hv hook <guest> <op> <subop> <extra>`,
    /// domain XML on stdin. Installed as a link
    /// /etc/libvirt/hooks/qemu.d/50-l3hv -> l3hv, it runs as the hook.
    Hook {
        #[arg(allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// List the VMs the agent routes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add or replace a VM from its JSON intent (file, or - for stdin).
    Set { file: PathBuf },
    /// Remove a VM (succeeds if it is already gone).
    Remove { name: String },
}

/// Seconds to wait for the agent (`--timeout`'s default).
const TIMEOUT: u64 = 10;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    if called_as_hook(&argv) {
        // libvirt's own call, `<guest> <op> <subop> <extra>` and nothing
        // else: parsed without clap, whose parser for the whole CLI costs
        // every one of the five hook runs per VM start.
        let hook_args: Vec<String> = argv[1..]
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return hook(
            std::path::Path::new(config::DEFAULT_PATH),
            Duration::from_secs(TIMEOUT),
            &hook_args,
        );
    }
    let args = Args::parse_from(argv);
    if let Cmd::Hook { args: hook_args } = &args.command {
        // Before anything else: the hook loads the configuration itself.
        return hook(&args.config, Duration::from_secs(args.timeout), hook_args);
    }
    let socket = match args.socket.clone() {
        Some(s) => s,
        None => match config::load(&args.config) {
            Ok(c) => c.control.socket,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
    };
    let (req, json) = match &args.command {
        Cmd::Hook { .. } => return ExitCode::SUCCESS,
        Cmd::Status { json } => (Request::Status, *json),
        Cmd::Reconcile { json } => (Request::Reconcile, *json),
        Cmd::Peers { json } => (Request::Peers, *json),
        Cmd::Routes { prefix, json } => (Request::Routes { prefix: *prefix }, *json),
        Cmd::Vm {
            command: VmCmd::List { json },
        } => (Request::ListVms, *json),
        Cmd::Vm {
            command: VmCmd::Remove { name },
        } => (Request::RemoveVm { name: name.clone() }, false),
        Cmd::Vm {
            command: VmCmd::Set { file },
        } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).map(|_| s)
            } else {
                std::fs::read_to_string(file)
            };
            let vm = text
                .map_err(|e| format!("{}: {e}", file.display()))
                .and_then(|t| {
                    serde_json::from_str::<VmIntent>(&t)
                        .map_err(|e| format!("{}: {e}", file.display()))
                });
            match vm {
                Ok(vm) => (Request::SetVm { vm }, false),
                Err(e) => {
                    eprintln!("l3hv: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("l3hv: {e}");
            return ExitCode::FAILURE;
        }
    };
    let answer = runtime.block_on(control::request(
        &socket,
        &req,
        Duration::from_secs(args.timeout),
    ));
    match answer {
        Ok(Response::Ok(v)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                match &args.command {
                    Cmd::Status { .. } => print!("{}", cli::render_status(&v)),
                    Cmd::Vm {
                        command: VmCmd::List { .. },
                    } => print!("{}", cli::render_vms(&v)),
                    Cmd::Peers { .. } => print!("{}", cli::render_peers(&v)),
                    Cmd::Routes { .. } => print!("{}", cli::render_routes(&v)),
                    Cmd::Reconcile { .. } => {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                    }
                    _ => {}
                }
            }
            ExitCode::SUCCESS
        }
        Ok(Response::Error(e)) => {
            eprintln!("l3hv: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("l3hv: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Called by a hook's name, l3hv is libvirt's hook: installed as the
/// symlink `/etc/libvirt/hooks/qemu.d/50-l3hv` (or `hooks/qemu`) to this
/// binary, libvirt's `50-l3hv <guest> <op> <subop> <extra>` is `l3hv hook
/// <guest> <op> <subop> <extra>` with no shell started in between (0.7 ms
/// of every hook call on these machines). Only `qemu` and `<digits>-l3hv`
/// (how qemu.d entries are ordered) count: a link named `my-l3hv` is still
/// the CLI.
fn called_as_hook(argv: &[OsString]) -> bool {
    let name = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("l3hv");
    let ordered = name
        .strip_suffix("-l3hv")
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
    name == "qemu" || ordered
}

/// `l3hv hook`: read stdin, one call to the agent, the exit code is the
/// verdict; nothing on stdout.
fn hook(config: &std::path::Path, timeout: Duration, hook_args: &[String]) -> ExitCode {
    use l3hv::{hook, libvirt::metadata::MAX_XML};
    let guest = hook_args.first().map_or("", String::as_str);
    let op = hook_args.get(1).map_or("", String::as_str);
    let mut xml = String::new();
    let read = std::io::stdin()
        .take(MAX_XML as u64 + 1)
        .read_to_string(&mut xml);
    if let Err(e) = read {
        xml.clear();
        if hook::step(op).strict {
            eprintln!("l3hv hook: {guest}: cannot read the domain XML: {e}");
            return ExitCode::FAILURE;
        }
    }
    let outcome = hook::run(config, guest, op, &xml, timeout);
    if let Some(m) = outcome.message {
        eprintln!("{m}");
    }
    ExitCode::from(outcome.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_hook_name_means_the_hook() {
        for name in [
            "/etc/libvirt/hooks/qemu.d/50-l3hv",
            "/etc/libvirt/hooks/qemu",
            "99-l3hv",
        ] {
            assert!(called_as_hook(&argv(&[
                name, "vm1", "prepare", "begin", "-"
            ])));
        }
        for name in [
            "l3hv",
            "/usr/bin/l3hv",
            "./target/release/l3hv",
            "/usr/local/bin/my-l3hv",
            "-l3hv",
            "50a-l3hv",
        ] {
            assert!(!called_as_hook(&argv(&[name, "status"])));
        }
        assert!(!called_as_hook(&[]));
        // `l3hv hook` itself still goes through the CLI's parser.
        let parsed = Args::try_parse_from(argv(&["l3hv", "hook", "vm1", "prepare", "begin", "-"]))
            .expect("parses");
        assert!(
            matches!(&parsed.command, Cmd::Hook { args } if args == &["vm1", "prepare", "begin", "-"])
        );
        assert_eq!(parsed.config, PathBuf::from(config::DEFAULT_PATH));
        assert_eq!(parsed.timeout, TIMEOUT);
    }
}
