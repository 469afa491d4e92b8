//! l3hvd: the l3hv agent. Arguments, configuration, logging, then the
//! agent loop; no logic of its own.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info};

use l3hv::{agent, config, control, dbus, libvirt, logging};

#[derive(Parser)]
#[command(version, about = "l3hv agent: routes the VMs of this hypervisor")]
struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Validate a configuration file and exit (0: valid, 1: invalid).
    #[arg(long, value_name = "PATH")]
    check_config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = args.check_config {
        return match config::load(&path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("l3hvd: invalid configuration, not starting (the kernel was not touched)");
            return ExitCode::FAILURE;
        }
    };
    logging::init(&config.log.level, config.log.format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: config::Config) -> ExitCode {
    let socket = config.control.socket.clone();
    let (dbus_config, libvirt_config) = (config.dbus.clone(), config.libvirt.clone());
    let (mut agent, handle) = match agent::Agent::new(config) {
        Ok(a) => a,
        Err(e) => {
            error!(error = %e, "cannot start");
            eprintln!("l3hvd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = agent.initial_reconcile().await;
    info!(
        planned = report.planned,
        failed = report.failed.len(),
        duration_ms = report.duration.as_secs_f64() * 1e3,
        "initial reconcile done"
    );
    let listener = match control::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "cannot open the control socket");
            return ExitCode::FAILURE;
        }
    };
    let agent_task = agent::spawn(agent);
    tokio::spawn(control::serve(listener, handle.clone()));
    // The D-Bus API and the libvirt connection (issue 4); both optional.
    let _dbus = match dbus_config.enabled {
        true => match dbus::serve(&dbus_config, handle.clone()).await {
            Ok(c) => Some(c),
            Err(e) => {
                error!(error = %e, "cannot serve the D-Bus API");
                return ExitCode::FAILURE;
            }
        },
        false => None,
    };
    if libvirt_config.enabled {
        tokio::spawn(libvirt::events::run(libvirt_config, handle));
    }
    info!(socket = %socket.display(), "ready");

    let stop = async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        let int = tokio::signal::ctrl_c();
        tokio::select! {
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => "SIGTERM",
            _ = int => "SIGINT",
        }
    };
    let why = stop.await;
    // Leaving is deliberately a no-op for the kernel: VM routes, rules,
    // taps and addresses stay, so forwarding goes on while we are away.
    info!(signal = why, "stopping; kernel state left in place");
    agent_task.abort();
    let _ = std::fs::remove_file(&socket);
    ExitCode::SUCCESS
}
