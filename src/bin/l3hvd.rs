//! l3hvd: the l3hv agent. Arguments, configuration, logging, then the
//! agent loop; no logic of its own. Speaks the systemd notify protocol
//! (READY=1 after the first reconcile, WATCHDOG=1 from the agent loop,
//! RELOADING=1 around a SIGHUP reload).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info, warn};

use l3hv::systemd::{Notifier, Watchdog};
use l3hv::{agent, config, control, dbus, libvirt, logging, metrics, services};

#[derive(Parser)]
#[command(version, about = "l3hv agent: routes the VMs of this hypervisor")]
pub struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Validate a configuration file and exit (0: valid, 1: invalid).
    #[arg(long, value_name = "PATH")]
    check_config: Option<PathBuf>,
}

fn main() -> ExitCode {
    one_malloc_arena();
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
    let log = logging::init(&config.log.level, config.log.format);
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
    runtime.block_on(run(config, args.config, log))
}

async fn run(config: config::Config, path: PathBuf, log: logging::LogHandle) -> ExitCode {
    let notifier = Notifier::from_env();
    let socket = config.control.socket.clone();
    let metrics_listen = config.metrics.listen;
    let shared = std::sync::Arc::new(config.clone());
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
    if let Some(e) = &report.error {
        tracing::warn!(error = %e, "initial reconcile could not run; retrying");
    }
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
    let metrics_listener = match metrics_listen {
        Some(addr) => match metrics::http::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                error!(error = %e, "cannot open the metrics endpoint");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let registry = services::Registry::default();
    agent.set_services(registry.clone());
    let watchdog = Watchdog::from_env(&notifier);
    if let Some(w) = &watchdog {
        info!(
            interval_ms = w.interval.as_millis() as u64,
            "systemd watchdog on"
        );
    }
    agent.set_watchdog(watchdog);
    // Runs until the process exits: leaving never waits for a pass.
    let (agent_thread, agent_rt) = match agent::spawn(agent) {
        Ok(t) => t,
        Err(e) => {
            error!(error = %e, "cannot start the agent's thread");
            return ExitCode::FAILURE;
        }
    };
    let bgp = {
        let _on_agent_thread = agent_rt.enter();
        l3hv::bgp::start(shared.clone(), handle.clone())
    };
    // Link notifications make the agent look again at once (a tap QEMU
    // just opened, an adopted interface created after its intent).
    match l3hv::netlink::monitor::link_changes(std::time::Duration::from_millis(50)) {
        Ok(mut changes) => {
            let agent = handle.clone();
            tokio::spawn(async move {
                while let Some(names) = changes.recv().await {
                    agent.links_changed(names).await;
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "no link notifications; relying on the periodic pass"),
    }
    // DHCP and RA follow the agent's intent; they start after the first
    // reconcile so the taps and gateway addresses exist.
    let _services = match services::spawn(shared, handle.subscribe_intent(), registry) {
        Ok(t) => t,
        Err(e) => {
            error!(error = %e, "cannot start the services' thread");
            return ExitCode::FAILURE;
        }
    };
    if let Some(l) = metrics_listener {
        tokio::spawn(metrics::http::serve(
            l,
            metrics::Sources::new(handle.clone(), bgp.clone()),
        ));
    }
    tokio::spawn(control::serve(listener, handle.clone(), bgp));
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
        tokio::spawn(libvirt::events::run(libvirt_config, handle.clone()));
    }
    info!(socket = %socket.display(), "ready");
    notifier.ready(&ready_status(&handle));

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    let agent_exit = agent::thread_exit(agent_thread);
    tokio::pin!(agent_exit);
    let why = loop {
        tokio::select! {
            _ = recv(&mut term) => break "SIGTERM",
            _ = tokio::signal::ctrl_c() => break "SIGINT",
            _ = recv(&mut hup) => reload(&path, &handle, &log, &notifier).await,
            how = &mut agent_exit => {
                // Its sessions and passes are gone; the kernel state stays
                // (as on any exit) and systemd starts us again.
                error!(thread = %how, "the agent's thread ended; exiting");
                notifier.stopping();
                let _ = std::fs::remove_file(&socket);
                return ExitCode::FAILURE;
            }
        }
    };
    notifier.stopping();
    // Leaving is deliberately a no-op for the kernel: VM routes, rules,
    // taps and addresses stay, so forwarding goes on while we are away.
    info!(signal = why, "stopping; kernel state left in place");
    let _ = std::fs::remove_file(&socket);
    ExitCode::SUCCESS
}

async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal.as_mut() {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// The STATUS= line sent with READY=1 at start.
fn ready_status(handle: &agent::AgentHandle) -> String {
    let stats = handle.subscribe_reconcile();
    let last = stats.borrow().last.clone();
    match last {
        Some(r) => format!(
            "first reconcile done: {} operations, {} failed",
            r.planned,
            r.failed.len()
        ),
        None => "first reconcile done".to_string(),
    }
}

/// SIGHUP (`systemctl reload`): re-read and validate the file; a bad one is
/// refused and the running configuration kept; a good one goes to the
/// agent, which applies what can change live.
async fn reload(
    path: &std::path::Path,
    handle: &agent::AgentHandle,
    log: &logging::LogHandle,
    notifier: &Notifier,
) {
    notifier.reloading();
    info!(file = %path.display(), "SIGHUP: reloading the configuration");
    let outcome = match config::load(path) {
        Err(e) => {
            for line in e.to_string().lines() {
                error!("reload refused, running configuration kept: {line}");
            }
            "reload refused: invalid configuration (see the log)".to_string()
        }
        Ok(new) => {
            let level = new.log.level.clone();
            match handle.reload(new).await {
                Err(e) => {
                    error!(error = %e, "reload refused, running configuration kept");
                    format!("reload refused: {e}")
                }
                Ok(notes) => {
                    match log.set_level(&level) {
                        Ok(true) => info!(level = %level, "log level set"),
                        Ok(false) => {}
                        Err(e) => warn!(error = %e, "log level kept"),
                    }
                    if notes.is_empty() {
                        info!("configuration reloaded");
                        "configuration reloaded".to_string()
                    } else {
                        warn!(
                            kept = notes.len(),
                            "configuration reloaded; some settings need a restart"
                        );
                        "configuration reloaded; some settings need a restart (see the log)"
                            .to_string()
                    }
                }
            }
        }
    };
    notifier.ready(&outcome);
}

/// One glibc malloc arena for the whole process, set before any thread
/// exists. With one per thread, a learn of 1,000,000 paths (built, before
/// the sessions moved to the agent's thread, by a worker thread, freed and
/// rebuilt by the agent's) left either
/// 210 or 241 MiB resident from run to run, the difference scattered over
/// the arenas where malloc_trim cannot return it; with one, 207-210 MiB in
/// every run and a lower peak (BENCHMARKS.md). l3hvd's threads allocate
/// little at once, so sharing the arena's lock costs nothing measurable.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt(3) only tunes the allocator; called first thing in
    // main, before any other thread can allocate.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
