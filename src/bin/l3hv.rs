//! l3hv: the operator CLI. Finds the agent from the configuration file and
//! talks to it over the control socket; no logic of its own.

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
    #[arg(long, global = true, default_value_t = 10)]
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
    /// Reconcile the kernel now and print the report.
    Reconcile {
        #[arg(long)]
        json: bool,
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

fn main() -> ExitCode {
    let args = Args::parse();
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
        Cmd::Status { json } => (Request::Status, *json),
        Cmd::Reconcile { json } => (Request::Reconcile, *json),
        Cmd::Peers { json } => (Request::Peers, *json),
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
