//! PURE: the BFD Control packet (RFC 5880 §4.1) and keyed SHA1
//! authentication (§4.4, §6.7.4).
//!
//! Written by hand: the format is 24 bytes plus an optional 28-byte
//! authentication section, and no maintained Rust crate implements it
//! together with the reception checks of §6.8.6 (the crates found are
//! dissectors or packet builders for captures).

use serde::Serialize;
use sha1::{Digest, Sha1};

/// Length of the mandatory section.
pub const MIN_LEN: usize = 24;
/// Length of a keyed SHA1 authentication section.
const SHA1_AUTH_LEN: usize = 28;
/// The largest packet accepted: the mandatory section plus the largest
/// authentication section (§4.1: Length is one octet).
pub const MAX_LEN: usize = 255;

/// bfd.SessionState (§4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(b: u8) -> Self {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::AdminDown => "admin-down",
            State::Down => "down",
            State::Init => "init",
            State::Up => "up",
        }
    }
}

/// Diagnostic codes (§4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Diag {
    None,
    ControlDetectionTimeExpired,
    EchoFunctionFailed,
    NeighborSignaledSessionDown,
    ForwardingPlaneReset,
    PathDown,
    ConcatenatedPathDown,
    AdministrativelyDown,
    ReverseConcatenatedPathDown,
    Other(u8),
}

impl Diag {
    pub fn from_code(c: u8) -> Self {
        match c {
            0 => Diag::None,
            1 => Diag::ControlDetectionTimeExpired,
            2 => Diag::EchoFunctionFailed,
            3 => Diag::NeighborSignaledSessionDown,
            4 => Diag::ForwardingPlaneReset,
            5 => Diag::PathDown,
            6 => Diag::ConcatenatedPathDown,
            7 => Diag::AdministrativelyDown,
            8 => Diag::ReverseConcatenatedPathDown,
            n => Diag::Other(n),
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Diag::None => 0,
            Diag::ControlDetectionTimeExpired => 1,
            Diag::EchoFunctionFailed => 2,
            Diag::NeighborSignaledSessionDown => 3,
            Diag::ForwardingPlaneReset => 4,
            Diag::PathDown => 5,
            Diag::ConcatenatedPathDown => 6,
            Diag::AdministrativelyDown => 7,
            Diag::ReverseConcatenatedPathDown => 8,
            Diag::Other(n) => n & 0x1f,
        }
    }
}

/// The authentication types l3hv implements (§4.4): both SHA1 variants.
/// Simple password and the MD5 types are refused at configuration time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthType {
    KeyedSha1,
    MeticulousKeyedSha1,
}

impl AuthType {
    fn code(self) -> u8 {
        match self {
            AuthType::KeyedSha1 => 4,
            AuthType::MeticulousKeyedSha1 => 5,
        }
    }

    pub fn meticulous(self) -> bool {
        self == AuthType::MeticulousKeyedSha1
    }
}

/// A shared key (§6.7.4: up to 20 octets, zero padded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthKey {
    pub kind: AuthType,
    pub key_id: u8,
    pub key: [u8; 20],
}

impl AuthKey {
    /// `None` when the key is empty or longer than 20 octets.
    pub fn new(kind: AuthType, key_id: u8, secret: &[u8]) -> Option<Self> {
        if secret.is_empty() || secret.len() > 20 {
            return None;
        }
        let mut key = [0u8; 20];
        key[..secret.len()].copy_from_slice(secret);
        Some(Self { kind, key_id, key })
    }
}

/// The authentication section as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthSection {
    pub auth_type: u8,
    pub key_id: u8,
    pub seq: u32,
}

/// One BFD Control packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub diag: Diag,
    pub state: State,
    pub poll: bool,
    pub fin: bool,
    /// C: Control Plane Independent.
    pub cpi: bool,
    pub demand: bool,
    pub multiplier: u8,
    pub my_disc: u32,
    pub your_disc: u32,
    /// Microseconds.
    pub desired_min_tx: u32,
    pub required_min_rx: u32,
    pub required_min_echo_rx: u32,
    pub auth: Option<AuthSection>,
}

/// Why a received packet was discarded (§6.8.6, first part).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("shorter than 24 octets")]
    Short,
    #[error("version {0} (only 1 is known)")]
    Version(u8),
    #[error("length field {0} does not fit the packet")]
    Length(u8),
    #[error("detect multiplier is zero")]
    ZeroMultiplier,
    #[error("multipoint bit set")]
    Multipoint,
    #[error("my discriminator is zero")]
    ZeroDiscriminator,
    #[error("your discriminator is zero in state {0:?}")]
    ZeroYourDiscriminator(State),
    #[error("malformed authentication section")]
    AuthSection,
}

impl PacketError {
    /// A short name for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PacketError::Short => "short",
            PacketError::Version(_) => "version",
            PacketError::Length(_) => "length",
            PacketError::ZeroMultiplier => "multiplier",
            PacketError::Multipoint => "multipoint",
            PacketError::ZeroDiscriminator | PacketError::ZeroYourDiscriminator(_) => {
                "discriminator"
            }
            PacketError::AuthSection => "auth-section",
        }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses and checks a received packet (§6.8.6 up to the discriminator
/// checks). Authentication is verified separately, by [`verify`], since it
/// needs the session's key and sequence state.
pub fn decode(b: &[u8]) -> Result<Control, PacketError> {
    if b.len() < MIN_LEN {
        return Err(PacketError::Short);
    }
    let version = b[0] >> 5;
    if version != 1 {
        return Err(PacketError::Version(version));
    }
    let flags = b[1];
    let auth_present = flags & 0x04 != 0;
    let len = b[3];
    let min = if auth_present { MIN_LEN + 2 } else { MIN_LEN };
    if (len as usize) < min || len as usize > b.len() {
        return Err(PacketError::Length(len));
    }
    let multiplier = b[2];
    if multiplier == 0 {
        return Err(PacketError::ZeroMultiplier);
    }
    if flags & 0x01 != 0 {
        return Err(PacketError::Multipoint);
    }
    let state = State::from_bits(flags >> 6);
    let my_disc = be32(b, 4);
    let your_disc = be32(b, 8);
    if my_disc == 0 {
        return Err(PacketError::ZeroDiscriminator);
    }
    if your_disc == 0 && !matches!(state, State::Down | State::AdminDown) {
        return Err(PacketError::ZeroYourDiscriminator(state));
    }
    let auth = if auth_present {
        let a = &b[MIN_LEN..len as usize];
        let auth_type = a[0];
        let auth_len = a[1] as usize;
        if auth_len < 3 || auth_len != a.len() {
            return Err(PacketError::AuthSection);
        }
        let key_id = a[2];
        // Sequence numbers exist only in the MD5 and SHA1 types (2..=5).
        let seq = if (2..=5).contains(&auth_type) {
            if auth_len < 8 {
                return Err(PacketError::AuthSection);
            }
            be32(a, 4)
        } else {
            0
        };
        Some(AuthSection {
            auth_type,
            key_id,
            seq,
        })
    } else {
        None
    };
    Ok(Control {
        diag: Diag::from_code(b[0] & 0x1f),
        state,
        poll: flags & 0x20 != 0,
        fin: flags & 0x10 != 0,
        cpi: flags & 0x08 != 0,
        demand: flags & 0x02 != 0,
        multiplier,
        my_disc,
        your_disc,
        desired_min_tx: be32(b, 12),
        required_min_rx: be32(b, 16),
        required_min_echo_rx: be32(b, 20),
        auth,
    })
}

/// Serialises `c`; with `auth`, appends a keyed SHA1 section with sequence
/// number `seq` and its digest (§6.7.4).
pub fn encode(c: &Control, auth: Option<(&AuthKey, u32)>) -> Vec<u8> {
    let len = MIN_LEN + if auth.is_some() { SHA1_AUTH_LEN } else { 0 };
    let mut b = Vec::with_capacity(len);
    b.push((1 << 5) | (c.diag.code() & 0x1f));
    let mut flags = (c.state as u8) << 6;
    for (set, bit) in [
        (c.poll, 0x20),
        (c.fin, 0x10),
        (c.cpi, 0x08),
        (auth.is_some(), 0x04),
        (c.demand, 0x02),
    ] {
        if set {
            flags |= bit;
        }
    }
    b.push(flags);
    b.push(c.multiplier);
    b.push(len as u8);
    for v in [
        c.my_disc,
        c.your_disc,
        c.desired_min_tx,
        c.required_min_rx,
        c.required_min_echo_rx,
    ] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    if let Some((key, seq)) = auth {
        b.push(key.kind.code());
        b.push(SHA1_AUTH_LEN as u8);
        b.push(key.key_id);
        b.push(0);
        b.extend_from_slice(&seq.to_be_bytes());
        // The digest is computed with the key in its place (§6.7.4).
        b.extend_from_slice(&key.key);
        let digest = Sha1::digest(&b);
        b[MIN_LEN + 8..].copy_from_slice(&digest);
    }
    b
}

/// Why an authenticated packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication expected but absent")]
    Missing,
    #[error("authentication present but not configured")]
    Unexpected,
    #[error("authentication type {0} not the configured one")]
    Type(u8),
    #[error("key id {0} unknown")]
    KeyId(u8),
    #[error("digest mismatch")]
    Digest,
    #[error("sequence number {0} out of window")]
    Sequence(u32),
}

/// Checks the digest of a received packet `b` (already decoded into `c`)
/// against `key`; the sequence window is the session's business.
pub fn verify(b: &[u8], c: &Control, key: Option<&AuthKey>) -> Result<(), AuthError> {
    match (c.auth, key) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(AuthError::Missing),
        (Some(_), None) => Err(AuthError::Unexpected),
        (Some(a), Some(key)) => {
            if a.auth_type != key.kind.code() {
                return Err(AuthError::Type(a.auth_type));
            }
            if a.key_id != key.key_id {
                return Err(AuthError::KeyId(a.key_id));
            }
            let len = b[3] as usize;
            if len != MIN_LEN + SHA1_AUTH_LEN || b.len() < len {
                return Err(AuthError::Digest);
            }
            let mut copy = b[..len].to_vec();
            copy[MIN_LEN + 8..].copy_from_slice(&key.key);
            let digest = Sha1::digest(&copy);
            // Not constant time: the digest covers a sequence number that
            // changes with every packet, so a timing oracle gains nothing.
            if digest.as_slice() == &b[MIN_LEN + 8..len] {
                Ok(())
            } else {
                Err(AuthError::Digest)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Control {
        Control {
            diag: Diag::None,
            state: State::Up,
            poll: true,
            fin: false,
            cpi: false,
            demand: false,
            multiplier: 3,
            my_disc: 0x0102_0304,
            your_disc: 0x0a0b_0c0d,
            desired_min_tx: 500_000,
            required_min_rx: 500_000,
            required_min_echo_rx: 0,
            auth: None,
        }
    }

    #[test]
    fn round_trip_and_wire_layout() {
        let c = sample();
        let b = encode(&c, None);
        assert_eq!(b.len(), 24);
        assert_eq!(b[0], 0x20, "version 1, diag 0");
        assert_eq!(b[1], 0xc0 | 0x20, "state up, poll");
        assert_eq!(&b[2..4], &[3, 24]);
        assert_eq!(&b[4..8], &[1, 2, 3, 4]);
        assert_eq!(&b[12..16], &500_000u32.to_be_bytes());
        assert_eq!(decode(&b).unwrap(), c);
    }

    #[test]
    fn reception_checks_of_6_8_6() {
        let good = encode(&sample(), None);
        assert_eq!(decode(&good[..23]), Err(PacketError::Short));
        let mut b = good.clone();
        b[0] = 0x40;
        assert_eq!(decode(&b), Err(PacketError::Version(2)));
        let mut b = good.clone();
        b[3] = 30;
        assert_eq!(decode(&b), Err(PacketError::Length(30)));
        let mut b = good.clone();
        b[3] = 20;
        assert_eq!(decode(&b), Err(PacketError::Length(20)));
        let mut b = good.clone();
        b[2] = 0;
        assert_eq!(decode(&b), Err(PacketError::ZeroMultiplier));
        let mut b = good.clone();
        b[1] |= 1;
        assert_eq!(decode(&b), Err(PacketError::Multipoint));
        let mut b = good.clone();
        b[4..8].fill(0);
        assert_eq!(decode(&b), Err(PacketError::ZeroDiscriminator));
        let mut b = good.clone();
        b[8..12].fill(0);
        assert_eq!(
            decode(&b),
            Err(PacketError::ZeroYourDiscriminator(State::Up))
        );
        // Your discriminator 0 is fine in Down.
        let mut c = sample();
        c.state = State::Down;
        c.your_disc = 0;
        assert!(decode(&encode(&c, None)).is_ok());
        // A length past the datagram, or an auth bit with no room.
        let mut b = good.clone();
        b[1] |= 0x04;
        assert_eq!(decode(&b), Err(PacketError::Length(24)));
        // Trailing bytes beyond Length are ignored.
        let mut b = good;
        b.extend_from_slice(&[0xff; 8]);
        assert!(decode(&b).is_ok());
    }

    #[test]
    fn sha1_digest_signs_and_verifies() {
        let key = AuthKey::new(AuthType::MeticulousKeyedSha1, 7, b"secret").unwrap();
        let c = sample();
        let b = encode(&c, Some((&key, 42)));
        assert_eq!(b.len(), 52);
        assert_eq!(b[3], 52);
        assert_eq!(&b[24..28], &[5, 28, 7, 0]);
        let d = decode(&b).unwrap();
        assert_eq!(
            d.auth,
            Some(AuthSection {
                auth_type: 5,
                key_id: 7,
                seq: 42
            })
        );
        assert_eq!(verify(&b, &d, Some(&key)), Ok(()));
        // Any flipped bit breaks the digest.
        for i in 0..b.len() {
            if (24..28).contains(&i) {
                continue; // type/len/key id have their own errors
            }
            let mut x = b.clone();
            x[i] ^= 0x10;
            if let Ok(d) = decode(&x) {
                assert_eq!(
                    verify(&x, &d, Some(&key)),
                    Err(AuthError::Digest),
                    "byte {i}"
                );
            }
        }
        let other = AuthKey::new(AuthType::MeticulousKeyedSha1, 7, b"Secret").unwrap();
        assert_eq!(verify(&b, &d, Some(&other)), Err(AuthError::Digest));
        let wrong_id = AuthKey::new(AuthType::MeticulousKeyedSha1, 8, b"secret").unwrap();
        assert_eq!(verify(&b, &d, Some(&wrong_id)), Err(AuthError::KeyId(7)));
        let keyed = AuthKey::new(AuthType::KeyedSha1, 7, b"secret").unwrap();
        assert_eq!(verify(&b, &d, Some(&keyed)), Err(AuthError::Type(5)));
        assert_eq!(verify(&b, &d, None), Err(AuthError::Unexpected));
        let plain = encode(&c, None);
        assert_eq!(
            verify(&plain, &decode(&plain).unwrap(), Some(&key)),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn key_length_is_checked() {
        assert!(AuthKey::new(AuthType::KeyedSha1, 1, b"").is_none());
        assert!(AuthKey::new(AuthType::KeyedSha1, 1, &[1; 21]).is_none());
        assert!(AuthKey::new(AuthType::KeyedSha1, 1, &[1; 20]).is_some());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x1234_5678_u32;
        for n in 0..20_000 {
            let len = n % 80;
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let mut b = b;
            if b.len() >= 4 && n % 2 == 0 {
                b[0] = 0x20;
                b[3] = b.len() as u8;
            }
            if let Ok(c) = decode(&b) {
                let key = AuthKey::new(AuthType::KeyedSha1, 1, b"k").unwrap();
                let _ = verify(&b, &c, Some(&key));
            }
        }
    }
}
