//! `l3hv hook`: libvirt's `qemu` hook. One domain operation → at most one
//! call to the agent → an exit code.
//!
//! libvirt runs `qemu <guest> <op> <subop> <extra>` with the domain XML on
//! stdin, synchronously, holding the domain's lock: this code never calls
//! libvirt (that deadlocks), makes exactly one bounded call to the agent
//! (D-Bus when `[dbus] enabled`, else the control socket) and never writes
//! to stdout (for `migrate`/`restore`, empty output means "XML unchanged").
//! libvirt gives hooks no environment, so the agent is found from the
//! configuration file.
//!
//! | op | call | agent refuses | agent unreachable |
//! |---|---|---|---|
//! | `prepare`, `start` | SetVm | exit 1: the domain does not start | exit 1 |
//! | `started`, `attach`, `reconnect` | SetVm | exit 1 if the intent is invalid, else 0 | exit 0 (the agent's libvirt connection catches up) |
//! | `stopped`, `release` | RemoveVm (idempotent) | exit 0 | exit 0 |
//! | `migrate`, `restore`, others | none | — | — |
//!
//! A failing `started` stops the guest and a failing `reconnect` kills QEMU,
//! hence their leniency. Domains without l3hv metadata are ignored (exit 0,
//! no call). On failure stderr gets one line, which libvirt reports.

use std::path::Path;
use std::time::Duration;

use crate::agent::ApiError;
use crate::config::{self, Config};
use crate::control::{self, Request, Response};
use crate::dbus;
use crate::intent::VmIntent;
use crate::libvirt::metadata;

/// What an operation asks of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Set,
    Remove,
    Nothing,
}

/// How an operation is handled (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    /// Any failure (refusal, agent unreachable, bad XML) fails the hook.
    pub strict: bool,
    /// Only an invalid intent fails the hook.
    pub fail_on_invalid: bool,
}

/// PURE: the handling of a libvirt qemu hook operation.
pub fn step(op: &str) -> Step {
    let (action, strict, fail_on_invalid) = match op {
        "prepare" | "start" => (Action::Set, true, true),
        "started" | "attach" | "reconnect" => (Action::Set, false, true),
        "stopped" | "release" => (Action::Remove, false, false),
        // migrate, restore (filters: no output = unchanged XML), and
        // operations libvirt may add later.
        _ => (Action::Nothing, false, false),
    };
    Step {
        action,
        strict,
        fail_on_invalid,
    }
}

/// The hook's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// 0: go on.
    pub code: u8,
    /// One line for stderr (libvirt logs it on failure).
    pub message: Option<String>,
}

impl Outcome {
    fn ok() -> Self {
        Self {
            code: 0,
            message: None,
        }
    }
    fn note(message: String) -> Self {
        Self {
            code: 0,
            message: Some(one_line(message)),
        }
    }
    fn fail(message: String) -> Self {
        Self {
            code: 1,
            message: Some(one_line(message)),
        }
    }
}

fn one_line(s: String) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    format!("l3hv hook: {s}")
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Dbus(String),
    Socket(std::path::PathBuf),
}

impl Transport {
    pub fn from_config(c: &Config) -> Self {
        if c.dbus.enabled {
            Transport::Dbus(c.dbus.bus.clone())
        } else {
            Transport::Socket(c.control.socket.clone())
        }
    }
}

/// The call's result: refused (with the agent's reason) or unreachable.
#[derive(Debug)]
enum CallError {
    Refused(ApiError),
    Unreachable(String),
}

/// Runs the hook for `op` on the domain XML `xml`, with the configuration at
/// `config_path`. Blocking, with no async runtime over either transport
/// (the control socket, or D-Bus through [`dbus::oneshot`]): the hook runs
/// five times per VM start, and a runtime built for one round trip was
/// part of every one.
pub fn run(config_path: &Path, guest: &str, op: &str, xml: &str, timeout: Duration) -> Outcome {
    let step = step(op);
    if step.action == Action::Nothing {
        return Outcome::ok();
    }
    let fail = |m: String| {
        if step.strict {
            Outcome::fail(m)
        } else {
            Outcome::note(m)
        }
    };
    let vm = match metadata::parse(xml) {
        Ok(Some(vm)) => vm,
        Ok(None) => return Outcome::ok(),
        Err(e) => {
            // Bad metadata is an invalid intent.
            return if step.fail_on_invalid {
                Outcome::fail(format!("{guest}: {e}"))
            } else {
                Outcome::note(format!("{guest}: {e}"))
            };
        }
    };
    let config = match config::load(config_path) {
        Ok(c) => c,
        Err(e) => return fail(format!("{guest}: agent configuration: {e}")),
    };
    let transport = Transport::from_config(&config);
    let result = match step.action {
        Action::Set if vm.interfaces.is_empty() => {
            if step.strict {
                // libvirt-managed NICs get their names at start; `started`
                // brings them.
                return Outcome::ok();
            }
            call(&transport, Call::Remove(vm.name.clone()), timeout)
        }
        Action::Set => call(&transport, Call::Set(vm.clone()), timeout),
        Action::Remove => call(&transport, Call::Remove(vm.name.clone()), timeout),
        Action::Nothing => return Outcome::ok(),
    };
    let what = match step.action {
        Action::Remove => "remove",
        _ => "route",
    };
    match result {
        Ok(()) => Outcome::ok(),
        Err(CallError::Unreachable(e)) => fail(format!(
            "{guest}: cannot {what} the VM: agent unreachable: {e}"
        )),
        Err(CallError::Refused(e)) => {
            let invalid = matches!(e, ApiError::Invalid(_) | ApiError::NotFound(_));
            let m = format!("{guest}: agent refused to {what} the VM: {e}");
            if step.strict || (invalid && step.fail_on_invalid) {
                Outcome::fail(m)
            } else {
                Outcome::note(m)
            }
        }
    }
}

enum Call {
    Set(VmIntent),
    Remove(String),
}

fn call(transport: &Transport, call: Call, timeout: Duration) -> Result<(), CallError> {
    match transport {
        Transport::Socket(path) => {
            let req = match call {
                Call::Set(vm) => Request::SetVm { vm },
                Call::Remove(name) => Request::RemoveVm { name },
            };
            match control::request_blocking(path, &req, timeout) {
                Ok(Response::Ok(_)) => Ok(()),
                Ok(Response::Error(e)) => Err(CallError::Refused(e)),
                Err(e) => Err(CallError::Unreachable(e.to_string())),
            }
        }
        Transport::Dbus(bus) => {
            use dbus::oneshot::{self, CallError as BusError};
            let interfaces;
            let (member, args): (&str, Vec<&str>) = match &call {
                Call::Set(vm) => {
                    interfaces = serde_json::to_string(&vm.interfaces)
                        .map_err(|e| CallError::Refused(ApiError::Internal(e.to_string())))?;
                    ("SetVm", vec![&vm.name, &interfaces])
                }
                Call::Remove(name) => ("RemoveVm", vec![name]),
            };
            let call = oneshot::Call {
                destination: dbus::BUS_NAME,
                path: dbus::OBJECT_PATH,
                interface: dbus::INTERFACE,
                member,
                args: &args,
            };
            match oneshot::call(bus, &call, timeout) {
                Ok(()) => Ok(()),
                Err(BusError::Reply { name, message }) => {
                    match dbus::DbusError::from_reply(&name, message.clone()) {
                        Some(e) => Err(CallError::Refused(e.into_api())),
                        // The bus answered for the agent (not running, or
                        // the policy refused us): the agent said nothing.
                        None => Err(CallError::Unreachable(format!(
                            "d-bus {bus}: {name}: {message}"
                        ))),
                    }
                }
                Err(BusError::Unreachable(m)) => {
                    Err(CallError::Unreachable(format!("d-bus {bus}: {m}")))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_libvirt_semantics() {
        for op in ["prepare", "start"] {
            let s = step(op);
            assert_eq!(s.action, Action::Set);
            assert!(s.strict);
        }
        for op in ["started", "attach", "reconnect"] {
            let s = step(op);
            assert_eq!(s.action, Action::Set);
            assert!(!s.strict && s.fail_on_invalid, "{op}");
        }
        for op in ["stopped", "release"] {
            let s = step(op);
            assert_eq!(s.action, Action::Remove);
            assert!(!s.strict && !s.fail_on_invalid, "{op}");
        }
        for op in ["migrate", "restore", "bogus", ""] {
            assert_eq!(step(op).action, Action::Nothing, "{op}");
        }
    }

    #[test]
    fn messages_are_one_line() {
        let o = Outcome::fail("a\nb\n  c".into());
        assert_eq!(o.message.as_deref(), Some("l3hv hook: a b c"));
        assert_eq!(o.code, 1);
    }

    #[test]
    fn no_metadata_and_filters_make_no_call() {
        let missing = Path::new("/nonexistent/l3hv.toml");
        let plain = "<domain><name>plain</name><devices/></domain>";
        for op in ["prepare", "started", "release", "migrate", "restore"] {
            let o = run(missing, "plain", op, plain, Duration::from_secs(1));
            assert_eq!(o, Outcome::ok(), "{op}");
        }
        // Malformed XML: prepare fails, release does not.
        let o = run(missing, "x", "prepare", "<domain", Duration::from_secs(1));
        assert_eq!(o.code, 1);
        let o = run(missing, "x", "release", "<domain", Duration::from_secs(1));
        assert_eq!(o.code, 0);
    }
}
