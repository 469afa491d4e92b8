//! One blocking D-Bus method call, for `l3hv hook`.
//!
//! Written by hand, not with zbus (which the agent serves with), because
//! libvirt runs the hook synchronously five times per VM start and every
//! millisecond of it delays the guest: zbus needs an async runtime and
//! takes the handshake one step at a time (authentication, then `Hello`,
//! then the call, each waiting for its answer), where this client writes
//! the authentication, `Hello` and the call in one `write` — as sd-bus does
//! — and then reads the answers, with no runtime and no thread. What one
//! call needs and nothing more: EXTERNAL authentication over a unix socket
//! (`unix:path=` and `unix:abstract=` addresses, parsed by zbus), a method call whose
//! arguments are strings, and a reply read in either byte order, every
//! length checked against the bytes received. Anything else from the bus
//! (a message it cannot read, an unknown header type) is an error, never a
//! panic.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// What went wrong with a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No answer from the service: the bus cannot be reached, refused us,
    /// closed, timed out, or sent what this client cannot read.
    #[error("{0}")]
    Unreachable(String),
    /// An error reply (from the service, or from the bus on its behalf,
    /// such as `org.freedesktop.DBus.Error.ServiceUnknown`).
    #[error("{name}: {message}")]
    Reply { name: String, message: String },
}

fn unreachable(m: impl Into<String>) -> CallError {
    CallError::Unreachable(m.into())
}

/// A method call to make.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub destination: &'a str,
    pub path: &'a str,
    pub interface: &'a str,
    pub member: &'a str,
    /// String arguments (signature `s...`).
    pub args: &'a [&'a str],
}

/// Longest message accepted from the bus. The replies read here are an
/// empty return, an error with one line, `Hello`'s name and the
/// `NameAcquired` signal; anything near this is not for us.
pub const MAX_MESSAGE: usize = 1 << 20;

const HELLO_SERIAL: u32 = 1;
const CALL_SERIAL: u32 = 2;

/// Where `bus` (`system`, `session` or a D-Bus address) listens, read by
/// zbus's own address parser: the hook finds the bus exactly as the agent
/// (which serves with zbus) does. Only unix sockets are spoken here.
pub fn endpoint(bus: &str) -> Result<Endpoint, CallError> {
    use zbus::address::transport::{Transport, UnixSocket};
    let address = match bus {
        "system" => zbus::Address::system(),
        "session" => zbus::Address::session(),
        address => address.parse::<zbus::Address>(),
    }
    .map_err(|e| unreachable(format!("D-Bus address: {e}")))?;
    let path = match address.transport() {
        Transport::Unix(unix) => unix.path(),
        _ => return Err(unreachable(format!("{address} is not a unix socket"))),
    };
    match path {
        UnixSocket::File(p) => Ok(Endpoint::Path(p.clone())),
        UnixSocket::Abstract(name) => {
            use std::os::unix::ffi::OsStrExt;
            Ok(Endpoint::Abstract(name.as_bytes().to_vec()))
        }
        _ => Err(unreachable(format!(
            "{address} is not a socket to connect to"
        ))),
    }
}

/// A unix socket to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Path(std::path::PathBuf),
    /// Linux abstract socket name (without the leading NUL).
    Abstract(Vec<u8>),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Path(p) => write!(f, "{}", p.display()),
            Endpoint::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// Makes `call` on `bus` and waits at most `timeout` for its reply:
/// `Ok(())` for a method return (its body is not read), the error's name
/// and first string argument for an error reply.
pub fn call(bus: &str, call: &Call<'_>, timeout: Duration) -> Result<(), CallError> {
    let deadline = Instant::now() + timeout;
    let endpoint = endpoint(bus)?;
    let mut stream = connect(&endpoint)
        .map_err(|e| unreachable(format!("cannot connect to the bus at {endpoint}: {e}")))?;
    // SAFETY: geteuid cannot fail and has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let mut out = handshake(uid);
    out.extend(method_call(
        HELLO_SERIAL,
        &Call {
            destination: "org.freedesktop.DBus",
            path: "/org/freedesktop/DBus",
            interface: "org.freedesktop.DBus",
            member: "Hello",
            args: &[],
        },
    )?);
    out.extend(method_call(CALL_SERIAL, call)?);
    stream
        .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(|e| unreachable(e.to_string()))?;
    stream
        .write_all(&out)
        .map_err(|e| unreachable(format!("writing to the bus: {e}")))?;
    let mut reader = Reader {
        stream,
        buf: Vec::with_capacity(4096),
        deadline,
    };
    let line = reader.line()?;
    if !line.starts_with(b"OK ") {
        return Err(unreachable(format!(
            "the bus refused EXTERNAL authentication: {}",
            String::from_utf8_lossy(&line).trim()
        )));
    }
    loop {
        let msg = reader.message()?;
        let reply = parse(&msg)?;
        match (reply.reply_serial, reply.kind) {
            (Some(CALL_SERIAL), Kind::Return) => return Ok(()),
            (Some(CALL_SERIAL | HELLO_SERIAL), Kind::Error) => {
                return Err(CallError::Reply {
                    name: reply.error_name.unwrap_or_default(),
                    message: reply.message.unwrap_or_default(),
                });
            }
            // Hello's answer, NameAcquired, anything else: not ours.
            _ => {}
        }
    }
}

fn connect(e: &Endpoint) -> std::io::Result<UnixStream> {
    match e {
        Endpoint::Path(p) => UnixStream::connect(p),
        Endpoint::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            UnixStream::connect_addr(&addr)
        }
    }
}

/// The client's side of the authentication, sent in one go: EXTERNAL with
/// our uid (its decimal digits, hex-encoded), then BEGIN without waiting
/// for OK; the bus reads them in order.
fn handshake(uid: u32) -> Vec<u8> {
    let digits = uid.to_string();
    let hex: String = digits.bytes().map(|b| format!("{b:02x}")).collect();
    format!("\0AUTH EXTERNAL {hex}\r\nBEGIN\r\n").into_bytes()
}

/// Appends little-endian values with D-Bus alignment (relative to the
/// start of the message, which `buf` begins with).
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn pad(&mut self, align: usize) {
        while !self.buf.len().is_multiple_of(align) {
            self.buf.push(0);
        }
    }
    fn u32(&mut self, v: u32) {
        self.pad(4);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn string(&mut self, s: &str) -> Result<(), CallError> {
        if s.contains('\0') {
            return Err(unreachable("a D-Bus string cannot contain NUL"));
        }
        let len = u32::try_from(s.len()).map_err(|_| unreachable("argument too long"))?;
        self.u32(len);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        Ok(())
    }
    fn signature(&mut self, s: &str) -> Result<(), CallError> {
        let len = u8::try_from(s.len()).map_err(|_| unreachable("signature too long"))?;
        self.buf.push(len);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        Ok(())
    }
    /// A header field: code, then a variant of type `sig`.
    fn field(&mut self, code: u8, sig: &str, value: &str) -> Result<(), CallError> {
        self.pad(8);
        self.buf.push(code);
        self.signature(sig)?;
        if sig == "g" {
            self.signature(value)
        } else {
            self.string(value)
        }
    }
}

/// A method call message (little-endian).
fn method_call(serial: u32, call: &Call<'_>) -> Result<Vec<u8>, CallError> {
    let mut w = Writer {
        buf: Vec::with_capacity(256),
    };
    // Byte order, type (1 = METHOD_CALL), flags, protocol version; body
    // length (patched below), serial; header fields' length (patched).
    w.buf.extend_from_slice(&[b'l', 1, 0, 1]);
    w.u32(0);
    w.u32(serial);
    w.u32(0);
    let fields_start = w.buf.len();
    w.field(1, "o", call.path)?;
    w.field(2, "s", call.interface)?;
    w.field(3, "s", call.member)?;
    w.field(6, "s", call.destination)?;
    let sig = "s".repeat(call.args.len());
    if !sig.is_empty() {
        w.field(8, "g", &sig)?;
    }
    let fields_len = (w.buf.len() - fields_start) as u32;
    w.pad(8);
    let body_start = w.buf.len();
    for a in call.args {
        w.string(a)?;
    }
    let body_len =
        u32::try_from(w.buf.len() - body_start).map_err(|_| unreachable("arguments too long"))?;
    w.buf[4..8].copy_from_slice(&body_len.to_le_bytes());
    w.buf[12..16].copy_from_slice(&fields_len.to_le_bytes());
    Ok(w.buf)
}

/// Reads lines and messages from the bus before a deadline.
struct Reader {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

impl Reader {
    fn fill(&mut self) -> Result<(), CallError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(unreachable("no answer in time"));
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| unreachable(e.to_string()))?;
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(unreachable("the bus closed the connection")),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(unreachable("no answer in time"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(unreachable(format!("reading from the bus: {e}"))),
        }
    }

    /// One authentication line, without its CRLF.
    fn line(&mut self) -> Result<Vec<u8>, CallError> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > 4096 {
                return Err(unreachable("authentication line too long"));
            }
            self.fill()?;
        }
    }

    /// One whole message.
    fn message(&mut self) -> Result<Vec<u8>, CallError> {
        while self.buf.len() < 16 {
            self.fill()?;
        }
        let total = message_len(&self.buf)?;
        while self.buf.len() < total {
            self.fill()?;
        }
        Ok(self.buf.drain(..total).collect())
    }
}

fn align(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

/// A message's length from its first 16 bytes.
fn message_len(head: &[u8]) -> Result<usize, CallError> {
    let e = Endian::of(head)?;
    let body = e.u32(head, 4)? as usize;
    let fields = e.u32(head, 12)? as usize;
    let total = align(16usize.saturating_add(fields), 8).saturating_add(body);
    if total > MAX_MESSAGE {
        return Err(unreachable(format!(
            "a {total}-byte message from the bus (more than {MAX_MESSAGE})"
        )));
    }
    Ok(total)
}

#[derive(Clone, Copy)]
enum Endian {
    Little,
    Big,
}

impl Endian {
    fn of(msg: &[u8]) -> Result<Self, CallError> {
        match msg.first() {
            Some(b'l') => Ok(Endian::Little),
            Some(b'B') => Ok(Endian::Big),
            _ => Err(unreachable("a message from the bus with no byte order")),
        }
    }
    fn u32(self, b: &[u8], at: usize) -> Result<u32, CallError> {
        let bytes: [u8; 4] = b
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| unreachable("a truncated message from the bus"))?;
        Ok(match self {
            Endian::Little => u32::from_le_bytes(bytes),
            Endian::Big => u32::from_be_bytes(bytes),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Call,
    Return,
    Error,
    Signal,
}

/// What this client needs from a message.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    kind: Kind,
    reply_serial: Option<u32>,
    error_name: Option<String>,
    /// An error's first argument, when it is a string.
    message: Option<String>,
}

/// Reads one whole message (as [`Reader::message`] cuts it).
fn parse(msg: &[u8]) -> Result<Parsed, CallError> {
    let bad = |what: &str| unreachable(format!("a malformed message from the bus: {what}"));
    let e = Endian::of(msg)?;
    let kind = match msg.get(1) {
        Some(1) => Kind::Call,
        Some(2) => Kind::Return,
        Some(3) => Kind::Error,
        Some(4) => Kind::Signal,
        _ => return Err(bad("unknown message type")),
    };
    if msg.len() != message_len(msg)? {
        return Err(bad("length"));
    }
    let fields_end = 16 + e.u32(msg, 12)? as usize;
    let mut c = Cursor { msg, at: 16, e };
    let mut out = Parsed {
        kind,
        reply_serial: None,
        error_name: None,
        message: None,
    };
    let mut signature = String::new();
    while c.at < fields_end {
        c.at = align(c.at, 8);
        if c.at >= fields_end {
            break;
        }
        let code = c.byte()?;
        let sig = c.signature()?;
        let value = c.basic(&sig)?;
        match (code, value) {
            (4, Value::Str(s)) => out.error_name = Some(s),
            (5, Value::U32(n)) => out.reply_serial = Some(n),
            (8, Value::Str(s)) => signature = s,
            (4 | 5 | 8, _) => return Err(bad("header field type")),
            _ => {}
        }
        if c.at > fields_end {
            return Err(bad("header fields overrun"));
        }
    }
    if kind == Kind::Error && signature.starts_with('s') {
        let mut body = Cursor {
            msg,
            at: align(fields_end, 8),
            e,
        };
        out.message = Some(body.string()?);
    }
    Ok(out)
}

enum Value {
    Str(String),
    U32(u32),
    Other,
}

struct Cursor<'a> {
    msg: &'a [u8],
    at: usize,
    e: Endian,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], CallError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.msg.len())
            .ok_or_else(|| unreachable("a truncated message from the bus"))?;
        let s = &self.msg[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn byte(&mut self) -> Result<u8, CallError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, CallError> {
        self.at = align(self.at, 4);
        let v = self.e.u32(self.msg, self.at)?;
        self.at += 4;
        Ok(v)
    }
    fn text(bytes: &[u8]) -> Result<String, CallError> {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| unreachable("a message from the bus with a string that is not UTF-8"))
    }
    /// A length-prefixed, NUL-terminated string (`s`, `o`).
    fn string(&mut self) -> Result<String, CallError> {
        let len = self.u32()? as usize;
        let s = Self::text(self.take(len)?)?;
        self.take(1)?;
        Ok(s)
    }
    /// A signature (`g`): one length byte.
    fn signature(&mut self) -> Result<String, CallError> {
        let len = self.byte()? as usize;
        let s = Self::text(self.take(len)?)?;
        self.take(1)?;
        Ok(s)
    }
    /// A header field's value: a basic type.
    fn basic(&mut self, sig: &str) -> Result<Value, CallError> {
        Ok(match sig {
            "s" | "o" => Value::Str(self.string()?),
            "g" => Value::Str(self.signature()?),
            "u" | "i" | "b" | "h" => Value::U32(self.u32()?),
            "y" => {
                self.byte()?;
                Value::Other
            }
            "n" | "q" => {
                self.at = align(self.at, 2);
                self.take(2)?;
                Value::Other
            }
            "x" | "t" | "d" => {
                self.at = align(self.at, 8);
                self.take(8)?;
                Value::Other
            }
            other => {
                return Err(unreachable(format!(
                    "a message from the bus with a `{other}` header field"
                )));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::message::Message;
    use zbus::wire::Endian as ZEndian;
    use zbus::wire::serialized::{Context, Data};

    const SET: Call<'static> = Call {
        destination: "net.l3hv.Agent1",
        path: "/net/l3hv/Agent",
        interface: "net.l3hv.Agent1",
        member: "SetVm",
        args: &["vm1", "[{\"name\":\"tap1\"}]"],
    };

    #[test]
    fn addresses() {
        assert_eq!(
            endpoint("unix:path=/run/dbus/system_bus_socket").unwrap(),
            Endpoint::Path("/run/dbus/system_bus_socket".into())
        );
        assert_eq!(
            endpoint("unix:abstract=/tmp/dbus-x,guid=0123456789abcdef0123456789abcdef").unwrap(),
            Endpoint::Abstract(b"/tmp/dbus-x".to_vec())
        );
        assert!(endpoint("tcp:host=localhost,port=1").is_err());
        assert!(endpoint("unix:tmpdir=/tmp").is_err());
        assert!(endpoint("no-colon").is_err());
    }

    #[test]
    fn the_handshake_names_our_uid() {
        assert_eq!(handshake(0), b"\0AUTH EXTERNAL 30\r\nBEGIN\r\n");
        assert_eq!(handshake(1000), b"\0AUTH EXTERNAL 31303030\r\nBEGIN\r\n");
    }

    /// zbus reads the call as what it says.
    #[test]
    fn a_call_is_a_valid_message() {
        let bytes = method_call(7, &SET).unwrap();
        assert_eq!(message_len(&bytes).unwrap(), bytes.len());
        let ctx = Context::new(ZEndian::Little, 0);
        let data = Data::new(bytes, ctx);
        // SAFETY: only parsed; a bad encoding is an Err, which fails the test.
        let msg = unsafe { Message::from_bytes(data) }.expect("zbus parses it");
        let h = msg.header();
        assert_eq!(h.primary().serial_num().get(), 7);
        assert_eq!(h.path().unwrap().as_str(), "/net/l3hv/Agent");
        assert_eq!(h.interface().unwrap().as_str(), "net.l3hv.Agent1");
        assert_eq!(h.member().unwrap().as_str(), "SetVm");
        assert_eq!(h.destination().unwrap().to_string(), "net.l3hv.Agent1");
        let (name, ifs): (String, String) = msg.body().deserialize().unwrap();
        assert_eq!(name, "vm1");
        assert_eq!(ifs, "[{\"name\":\"tap1\"}]");
        // No arguments, no signature field.
        let hello = method_call(1, &Call { args: &[], ..SET }).unwrap();
        assert_eq!(message_len(&hello).unwrap(), hello.len());
        assert!(
            method_call(
                1,
                &Call {
                    args: &["a\0b"],
                    ..SET
                }
            )
            .is_err()
        );
    }

    fn call_header(endian: ZEndian) -> Message {
        Message::method_call("/net/l3hv/Agent", "SetVm")
            .serial(std::num::NonZeroU32::new(CALL_SERIAL).unwrap())
            .endian(endian)
            .build(&())
            .unwrap()
    }

    /// Replies as zbus writes them, in both byte orders.
    fn replies(endian: ZEndian) -> Vec<(Vec<u8>, Parsed)> {
        let call = call_header(endian);
        let ret = Message::method_return(&call.header())
            .endian(endian)
            .build(&("ignored body", 5u32))
            .unwrap();
        let err = Message::error(&call.header(), "net.l3hv.Error.Invalid")
            .endian(endian)
            .build(&("interfaces: bad",))
            .unwrap();
        let bare = Message::error(&call.header(), "org.example.Error.NoText")
            .endian(endian)
            .build(&(3u32,))
            .unwrap();
        let signal = Message::signal(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameAcquired",
        )
        .endian(endian)
        .build(&(":1.5",))
        .unwrap();
        vec![
            (
                ret.data().to_vec(),
                Parsed {
                    kind: Kind::Return,
                    reply_serial: Some(CALL_SERIAL),
                    error_name: None,
                    message: None,
                },
            ),
            (
                err.data().to_vec(),
                Parsed {
                    kind: Kind::Error,
                    reply_serial: Some(CALL_SERIAL),
                    error_name: Some("net.l3hv.Error.Invalid".into()),
                    message: Some("interfaces: bad".into()),
                },
            ),
            (
                bare.data().to_vec(),
                Parsed {
                    kind: Kind::Error,
                    reply_serial: Some(CALL_SERIAL),
                    error_name: Some("org.example.Error.NoText".into()),
                    message: None,
                },
            ),
            (
                signal.data().to_vec(),
                Parsed {
                    kind: Kind::Signal,
                    reply_serial: None,
                    error_name: None,
                    message: None,
                },
            ),
        ]
    }

    #[test]
    fn reads_what_zbus_writes() {
        for endian in [ZEndian::Little, ZEndian::Big] {
            for (bytes, want) in replies(endian) {
                assert_eq!(message_len(&bytes).unwrap(), bytes.len());
                assert_eq!(parse(&bytes).unwrap(), want);
            }
        }
    }

    /// Every truncation and every single-byte change of a valid reply is
    /// an answer or an error, never a panic; lengths beyond the limit are
    /// refused before anything is read.
    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut rng = fastrand::Rng::with_seed(6);
        for endian in [ZEndian::Little, ZEndian::Big] {
            for (bytes, _) in replies(endian) {
                for n in 0..bytes.len() {
                    let _ = message_len(&bytes[..n]);
                    assert!(parse(&bytes[..n]).is_err(), "a {n}-byte prefix parsed");
                }
                for i in 0..bytes.len() {
                    for _ in 0..16 {
                        let mut b = bytes.clone();
                        b[i] = rng.u8(..);
                        let _ = parse(&b);
                    }
                }
            }
        }
        let mut huge = replies(ZEndian::Little).remove(0).0;
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(message_len(&huge).is_err());
    }
}
