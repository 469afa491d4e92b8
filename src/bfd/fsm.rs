//! PURE: one BFD session in asynchronous mode (RFC 5880 §6.8): the state
//! machine, timer negotiation with the poll sequence (§6.8.3), detection
//! (§6.8.4), reception (§6.8.6), transmission (§6.8.7) and the SHA1
//! sequence windows (§6.7.4). Time is passed in; nothing here does I/O, so
//! every rule is unit-tested with a simulated clock.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::packet::{self, AuthError, AuthKey, Control, Diag, PacketError, State};

/// While a session is not Up, it transmits no faster than once a second
/// (§6.8.3).
pub const SLOW_TX_US: u32 = 1_000_000;

/// Configured timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub min_tx: Duration,
    pub min_rx: Duration,
    pub multiplier: u8,
}

fn us(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// A state change, for the session's clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub diag: Diag,
    /// Leaving an Up that was resumed and never confirmed by the peer:
    /// not a failure of the path seen by BFD.
    pub unconfirmed: bool,
}

/// Why a received packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Discard {
    #[error(transparent)]
    Packet(#[from] PacketError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("your discriminator {0} is not ours")]
    Discriminator(u32),
    #[error("session administratively down")]
    AdminDown,
}

impl Discard {
    pub fn kind(&self) -> &'static str {
        match self {
            Discard::Packet(p) => p.kind(),
            Discard::Auth(_) => "auth",
            Discard::Discriminator(_) => "discriminator",
            Discard::AdminDown => "admin-down",
        }
    }
}

/// What the caller must do after a received packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    pub transition: Option<Transition>,
    /// Send a packet now: a Final answering a Poll, or a state change.
    pub send_now: bool,
    /// The packet now due is a Final.
    pub fin: bool,
}

/// What survives an agent restart (see docs/bfd-and-graceful-restart.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub local_disc: u32,
    pub remote_disc: u32,
    pub remote_min_rx: u32,
    pub remote_desired_min_tx: u32,
    pub remote_multiplier: u8,
    pub xmit_seq: u32,
}

#[derive(Debug, Clone)]
pub struct Fsm {
    pub local_disc: u32,
    pub remote_disc: u32,
    pub state: State,
    pub remote_state: State,
    pub diag: Diag,
    pub remote_diag: Diag,
    cfg: Timers,
    /// What we advertise (µs).
    desired_min_tx: u32,
    required_min_rx: u32,
    /// What is in force: an increase of our transmit interval or a
    /// decrease of our receive interval waits for the Final (§6.8.3).
    tx_in_force: u32,
    rx_in_force: u32,
    remote_min_rx: u32,
    remote_desired_min_tx: u32,
    remote_multiplier: u8,
    polling: bool,
    detect_deadline: Option<Instant>,
    next_tx: Instant,
    auth: Option<AuthKey>,
    xmit_seq: u32,
    rcv_seq: Option<u32>,
    /// Resumed from a snapshot and not yet confirmed by the peer.
    pub resumed: bool,
}

impl Fsm {
    pub fn new(
        local_disc: u32,
        cfg: Timers,
        auth: Option<AuthKey>,
        seq: u32,
        now: Instant,
    ) -> Self {
        let slow = us(cfg.min_tx).max(SLOW_TX_US);
        Self {
            local_disc,
            remote_disc: 0,
            state: State::Down,
            remote_state: State::Down,
            diag: Diag::None,
            remote_diag: Diag::None,
            cfg,
            desired_min_tx: slow,
            required_min_rx: us(cfg.min_rx),
            tx_in_force: slow,
            rx_in_force: us(cfg.min_rx),
            // §6.8.1: initialised to 1 µs.
            remote_min_rx: 1,
            remote_desired_min_tx: 0,
            remote_multiplier: 0,
            polling: false,
            detect_deadline: None,
            next_tx: now,
            auth,
            xmit_seq: seq,
            rcv_seq: None,
            resumed: false,
        }
    }

    /// A session that was Up when the previous agent stopped: it goes on
    /// transmitting Up with the same discriminators, so a peer whose
    /// detection time has not passed never sees it go down. The first
    /// packet from the peer confirms it (or brings it down, if the peer
    /// saw it go).
    pub fn resume(s: Snapshot, cfg: Timers, auth: Option<AuthKey>, now: Instant) -> Self {
        let mut f = Self::new(s.local_disc, cfg, auth, s.xmit_seq, now);
        f.remote_disc = s.remote_disc;
        f.state = State::Up;
        f.remote_state = State::Up;
        f.desired_min_tx = us(cfg.min_tx);
        f.tx_in_force = us(cfg.min_tx);
        f.remote_min_rx = s.remote_min_rx;
        f.remote_desired_min_tx = s.remote_desired_min_tx;
        f.remote_multiplier = s.remote_multiplier;
        f.detect_deadline = Some(now + f.detection_time());
        f.resumed = true;
        f
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            local_disc: self.local_disc,
            remote_disc: self.remote_disc,
            remote_min_rx: self.remote_min_rx,
            remote_desired_min_tx: self.remote_desired_min_tx,
            remote_multiplier: self.remote_multiplier,
            xmit_seq: self.xmit_seq,
        }
    }

    /// The negotiated interval at which we transmit; `None` when the peer
    /// asked for no packets (Required Min RX 0).
    pub fn tx_interval(&self) -> Option<Duration> {
        if self.remote_min_rx == 0 {
            return None;
        }
        Some(Duration::from_micros(
            self.tx_in_force.max(self.remote_min_rx) as u64,
        ))
    }

    /// Detection time (§6.8.4, asynchronous mode).
    pub fn detection_time(&self) -> Duration {
        Duration::from_micros(
            self.remote_multiplier as u64 * self.rx_in_force.max(self.remote_desired_min_tx) as u64,
        )
    }

    pub fn remote_multiplier(&self) -> u8 {
        self.remote_multiplier
    }

    pub fn polling(&self) -> bool {
        self.polling
    }

    /// When the caller must next call [`Fsm::on_timer`].
    pub fn next_deadline(&self) -> Instant {
        match self.detect_deadline {
            Some(d) if d < self.next_tx || self.tx_interval().is_none() => d,
            _ if self.tx_interval().is_none() => self.next_tx + Duration::from_secs(3600),
            _ => self.next_tx,
        }
    }

    fn set_state(&mut self, to: State, diag: Diag) -> Option<Transition> {
        if to == self.state {
            return None;
        }
        let from = self.state;
        let unconfirmed = self.resumed;
        self.state = to;
        self.diag = diag;
        // Keyed (not meticulous) SHA1 may keep its sequence number; l3hv
        // moves it on state changes only, so a resumed session continues
        // it exactly.
        if self.auth.as_ref().is_some_and(|k| !k.kind.meticulous()) {
            self.xmit_seq = self.xmit_seq.wrapping_add(1);
        }
        if to == State::Up {
            // Leave the slow rate for the configured one, by a poll.
            self.change_timers(us(self.cfg.min_tx), us(self.cfg.min_rx));
        } else if from == State::Up {
            let slow = us(self.cfg.min_tx).max(SLOW_TX_US);
            self.desired_min_tx = slow;
            self.tx_in_force = slow;
            self.polling = false;
            self.resumed = false;
        }
        Some(Transition {
            from,
            to,
            diag,
            unconfirmed,
        })
    }

    fn change_timers(&mut self, tx: u32, rx: u32) {
        let tx = if self.state == State::Up {
            tx
        } else {
            tx.max(SLOW_TX_US)
        };
        if tx == self.desired_min_tx && rx == self.required_min_rx {
            return;
        }
        // A faster transmit rate and a slower receive rate are safe at
        // once; the others wait for the Final.
        if tx < self.tx_in_force || self.state != State::Up {
            self.tx_in_force = tx;
        }
        if rx > self.rx_in_force || self.state != State::Up {
            self.rx_in_force = rx;
        }
        self.desired_min_tx = tx;
        self.required_min_rx = rx;
        if self.state == State::Up {
            self.polling = true;
        }
    }

    /// New configured timers (a reload): a poll sequence when Up.
    pub fn reconfigure(&mut self, cfg: Timers) {
        self.cfg = cfg;
        self.change_timers(us(cfg.min_tx), us(cfg.min_rx));
    }

    /// §6.8.6: checks and applies one received packet.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) -> Result<Outcome, Discard> {
        let c = packet::decode(bytes)?;
        if c.your_disc != 0 && c.your_disc != self.local_disc {
            return Err(Discard::Discriminator(c.your_disc));
        }
        packet::verify(bytes, &c, self.auth.as_ref())?;
        if let (Some(key), Some(a)) = (&self.auth, c.auth) {
            if let Some(last) = self.rcv_seq {
                // Keyed: [last, last + 3M]; meticulous: (last, last + 3M].
                let window = 3 * self.cfg.multiplier.max(c.multiplier) as u32;
                let ahead = a.seq.wrapping_sub(last);
                let ok = if key.kind.meticulous() {
                    (1..=window).contains(&ahead)
                } else {
                    ahead <= window
                };
                if !ok {
                    return Err(AuthError::Sequence(a.seq).into());
                }
            }
            self.rcv_seq = Some(a.seq);
        }
        self.remote_disc = c.my_disc;
        self.remote_state = c.state;
        self.remote_diag = c.diag;
        self.remote_min_rx = c.required_min_rx;
        self.remote_desired_min_tx = c.desired_min_tx;
        self.remote_multiplier = c.multiplier;
        if c.fin && self.polling {
            self.polling = false;
            self.tx_in_force = self.desired_min_tx;
            self.rx_in_force = self.required_min_rx;
        }
        if self.state == State::AdminDown {
            return Err(Discard::AdminDown);
        }
        let mut out = Outcome::default();
        let next = match (self.state, c.state) {
            (State::Down, _) | (State::Init, _) | (State::Up, _) if c.state == State::AdminDown => {
                (State::Down, Diag::NeighborSignaledSessionDown)
            }
            (State::Down, State::Down) => (State::Init, Diag::None),
            (State::Down, State::Init) => (State::Up, Diag::None),
            (State::Init, State::Init | State::Up) => (State::Up, Diag::None),
            (State::Up, State::Down) => (State::Down, Diag::NeighborSignaledSessionDown),
            (s, _) => (s, self.diag),
        };
        if self.state == State::Up && next.0 == State::Up {
            self.resumed = false;
        }
        if let Some(t) = self.set_state(next.0, next.1) {
            out.transition = Some(t);
            out.send_now = true;
        }
        if c.poll {
            out.send_now = true;
            out.fin = true;
        }
        self.detect_deadline = Some(now + self.detection_time());
        // A faster peer rate may pull our next packet in.
        if let Some(iv) = self.tx_interval() {
            if self.next_tx > now + iv {
                self.next_tx = now + iv;
            }
        }
        Ok(out)
    }

    /// Detection (§6.8.4); returns the transition when the session fell.
    pub fn on_timer(&mut self, now: Instant) -> Option<Transition> {
        match self.detect_deadline {
            Some(d) if d <= now => {
                self.detect_deadline = None;
                self.remote_disc = 0;
                self.rcv_seq = None;
                self.remote_state = State::Down;
                if matches!(self.state, State::Init | State::Up) {
                    self.set_state(State::Down, Diag::ControlDetectionTimeExpired)
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// Is a periodic packet due?
    pub fn tx_due(&self, now: Instant) -> bool {
        self.tx_interval().is_some() && now >= self.next_tx
    }

    /// Builds the next packet. `fin` answers a Poll (and then carries no
    /// Poll itself). `jitter` in [0, 1) picks the next interval in the
    /// 75-100% range of §6.8.7 (75-90% with a multiplier of 1).
    pub fn transmit(&mut self, now: Instant, fin: bool, jitter: f64) -> Vec<u8> {
        let c = Control {
            diag: self.diag,
            state: self.state,
            poll: self.polling && !fin,
            fin,
            // The sessions live in the agent's process and share its fate.
            cpi: false,
            demand: false,
            multiplier: self.cfg.multiplier,
            my_disc: self.local_disc,
            your_disc: self.remote_disc,
            desired_min_tx: self.desired_min_tx,
            required_min_rx: self.required_min_rx,
            required_min_echo_rx: 0,
            auth: None,
        };
        let bytes = match &self.auth {
            Some(key) => {
                if key.kind.meticulous() {
                    self.xmit_seq = self.xmit_seq.wrapping_add(1);
                }
                packet::encode(&c, Some((key, self.xmit_seq)))
            }
            None => packet::encode(&c, None),
        };
        if let Some(iv) = self.tx_interval() {
            let top = if self.cfg.multiplier == 1 { 0.90 } else { 1.0 };
            let f = 0.75 + (top - 0.75) * jitter.clamp(0.0, 1.0);
            self.next_tx = now + iv.mul_f64(f);
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bfd::packet::{AuthType, decode, encode};

    const MS: Duration = Duration::from_millis(1);

    fn timers(ms: u64) -> Timers {
        Timers {
            min_tx: MS * ms as u32,
            min_rx: MS * ms as u32,
            multiplier: 3,
        }
    }

    /// Runs two sessions against each other, delivering every packet at
    /// once, for `until`; returns the transitions of `a`.
    fn exchange(a: &mut Fsm, b: &mut Fsm, start: Instant, until: Duration) -> Vec<Transition> {
        let mut t = start;
        let mut seen = vec![];
        while t < start + until {
            // (to a?, bytes)
            let mut queue: Vec<(bool, Vec<u8>)> = vec![];
            if let Some(tr) = a.on_timer(t) {
                seen.push(tr);
            }
            b.on_timer(t);
            if a.tx_due(t) {
                queue.push((false, a.transmit(t, false, 0.5)));
            }
            if b.tx_due(t) {
                queue.push((true, b.transmit(t, false, 0.5)));
            }
            while !queue.is_empty() {
                let (to_a, p) = queue.remove(0);
                let (x, mine) = if to_a {
                    (&mut *a, true)
                } else {
                    (&mut *b, false)
                };
                let out = x.receive(&p, t).expect("valid");
                if mine {
                    seen.extend(out.transition);
                }
                if out.send_now {
                    let fin = decode(&p).unwrap().poll;
                    queue.push((!to_a, x.transmit(t, fin, 0.5)));
                }
            }
            t += MS;
        }
        seen
    }

    #[test]
    fn three_way_handshake_then_poll_to_the_configured_rate() {
        let now = Instant::now();
        let mut a = Fsm::new(1, timers(100), None, 0, now);
        let mut b = Fsm::new(2, timers(100), None, 0, now);
        assert_eq!(a.tx_interval(), Some(Duration::from_micros(1_000_000)));
        let seen = exchange(&mut a, &mut b, now, Duration::from_secs(3));
        assert_eq!(a.state, State::Up);
        assert_eq!(b.state, State::Up);
        assert_eq!(seen.first().map(|t| t.to), Some(State::Init));
        assert!(seen.iter().any(|t| t.to == State::Up));
        assert!(!a.polling() && !b.polling(), "poll sequences completed");
        assert_eq!(a.tx_interval(), Some(MS * 100));
        assert_eq!(a.detection_time(), MS * 300);
        assert_eq!(a.remote_disc, 2);
    }

    fn up_pair(ms: u64) -> (Fsm, Fsm, Instant) {
        let now = Instant::now();
        let mut a = Fsm::new(1, timers(ms), None, 0, now);
        let mut b = Fsm::new(2, timers(ms), None, 0, now);
        exchange(&mut a, &mut b, now, Duration::from_secs(3));
        assert_eq!(a.state, State::Up);
        (a, b, now + Duration::from_secs(3))
    }

    #[test]
    fn silence_for_the_detection_time_brings_the_session_down() {
        let (mut a, _b, t) = up_pair(100);
        // Last packet at most 100 ms ago; detection 300 ms.
        assert_eq!(a.on_timer(t + MS * 150), None);
        let tr = a.on_timer(t + MS * 301).expect("down");
        assert_eq!(tr.to, State::Down);
        assert_eq!(tr.diag, Diag::ControlDetectionTimeExpired);
        assert_eq!(a.remote_disc, 0, "§6.8.1");
        assert_eq!(a.tx_interval(), Some(Duration::from_secs(1)), "slow again");
        let p = decode(&a.transmit(t, false, 0.0)).unwrap();
        assert_eq!((p.state, p.your_disc, p.diag.code()), (State::Down, 0, 1));
        assert!(!p.cpi, "C bit: BFD shares fate with the agent");
    }

    #[test]
    fn peer_signalling_down_or_admin_down_brings_us_down() {
        for state in [State::Down, State::AdminDown] {
            let (mut a, mut b, t) = up_pair(50);
            b.state = state;
            let out = a.receive(&b.transmit(t, false, 0.0), t).unwrap();
            let tr = out.transition.unwrap();
            assert_eq!(tr.to, State::Down);
            assert_eq!(tr.diag, Diag::NeighborSignaledSessionDown);
            assert!(out.send_now);
        }
    }

    #[test]
    fn a_poll_is_answered_at_once_with_a_final_and_no_poll() {
        let (mut a, mut b, t) = up_pair(100);
        b.reconfigure(timers(300));
        assert!(b.polling());
        let p = b.transmit(t, false, 0.0);
        assert!(decode(&p).unwrap().poll);
        let out = a.receive(&p, t).unwrap();
        assert!(out.send_now);
        let f = decode(&a.transmit(t, true, 0.0)).unwrap();
        assert!(f.fin && !f.poll);
        // b's slower transmit rate takes effect only with the Final.
        assert_eq!(b.tx_interval(), Some(MS * 100));
        b.receive(&encode(&f, None), t).unwrap();
        assert!(!b.polling());
        assert_eq!(b.tx_interval(), Some(MS * 300));
        // a now expects b's packets every 300 ms: detection 900 ms.
        assert_eq!(a.detection_time(), MS * 900);
    }

    #[test]
    fn slower_receive_is_at_once_faster_receive_waits_for_the_final() {
        let (_a, mut b, _t) = up_pair(100);
        b.reconfigure(Timers {
            min_tx: MS * 100,
            min_rx: MS * 50,
            multiplier: 3,
        });
        assert_eq!(b.detection_time(), MS * 300, "old 100 ms until the Final");
        let mut b2 = b.clone();
        b2.reconfigure(Timers {
            min_tx: MS * 100,
            min_rx: MS * 500,
            multiplier: 3,
        });
        assert_eq!(b2.detection_time(), MS * 1500);
    }

    #[test]
    fn transmit_interval_is_jittered_and_respects_the_peer() {
        let (mut a, _b, t) = up_pair(100);
        a.transmit(t, false, 0.0);
        assert_eq!(a.next_deadline().min(t + MS * 75), t + MS * 75);
        a.transmit(t, false, 0.999);
        assert!(a.next_tx <= t + MS * 100 && a.next_tx > t + MS * 99);
        a.remote_min_rx = 400_000;
        a.transmit(t, false, 0.0);
        assert_eq!(a.next_tx, t + MS * 300);
        a.remote_min_rx = 0;
        assert_eq!(a.tx_interval(), None, "peer wants no packets");
        assert!(!a.tx_due(t + Duration::from_secs(10)));
    }

    #[test]
    fn packets_for_another_discriminator_are_discarded() {
        let (mut a, mut b, t) = up_pair(100);
        b.remote_disc = 99;
        let p = b.transmit(t, false, 0.0);
        assert_eq!(a.receive(&p, t), Err(Discard::Discriminator(99)));
        assert_eq!(a.state, State::Up);
    }

    fn auth_pair(kind: AuthType) -> (Fsm, Fsm, Instant) {
        let now = Instant::now();
        let key = AuthKey::new(kind, 1, b"k3y").unwrap();
        let mut a = Fsm::new(1, timers(100), Some(key.clone()), 1000, now);
        let mut b = Fsm::new(2, timers(100), Some(key), 5000, now);
        exchange(&mut a, &mut b, now, Duration::from_secs(3));
        (a, b, now + Duration::from_secs(3))
    }

    #[test]
    fn sha1_sessions_come_up_and_refuse_replays() {
        for kind in [AuthType::KeyedSha1, AuthType::MeticulousKeyedSha1] {
            let (mut a, mut b, t) = auth_pair(kind);
            assert_eq!(a.state, State::Up, "{kind:?}");
            let p = b.transmit(t, false, 0.0);
            a.receive(&p, t).unwrap();
            let replay = a.receive(&p, t);
            if kind.meticulous() {
                assert!(matches!(replay, Err(Discard::Auth(AuthError::Sequence(_)))));
            } else {
                assert!(replay.is_ok(), "keyed SHA1 accepts an equal number");
            }
            // Far ahead of the window.
            b.xmit_seq = b.xmit_seq.wrapping_add(1000);
            assert!(matches!(
                a.receive(&b.transmit(t, false, 0.0), t),
                Err(Discard::Auth(AuthError::Sequence(_)))
            ));
        }
    }

    #[test]
    fn unauthenticated_packets_are_refused_when_a_key_is_set() {
        let (mut a, mut b, t) = auth_pair(AuthType::KeyedSha1);
        b.auth = None;
        assert_eq!(
            a.receive(&b.transmit(t, false, 0.0), t),
            Err(Discard::Auth(AuthError::Missing))
        );
    }

    #[test]
    fn a_resumed_session_carries_on_up_with_the_same_discriminators() {
        let (a, mut b, t) = up_pair(100);
        let snap = a.snapshot();
        let mut r = Fsm::resume(snap, timers(100), None, t);
        assert_eq!(r.state, State::Up);
        assert!(r.resumed);
        // The peer still Up accepts our packets without a transition.
        let out = b.receive(&r.transmit(t, false, 0.0), t).unwrap();
        assert_eq!(out.transition, None);
        let out = r.receive(&b.transmit(t, false, 0.0), t).unwrap();
        assert_eq!(out.transition, None);
        assert!(!r.resumed, "confirmed by the peer");
        // A peer that saw us go sends Down: the resumed session falls.
        let mut r = Fsm::resume(snap, timers(100), None, t);
        b.state = State::Down;
        b.remote_disc = 0;
        let out = r.receive(&b.transmit(t, false, 0.0), t).unwrap();
        assert_eq!(out.transition.map(|t| t.to), Some(State::Down));
    }

    #[test]
    fn garbage_is_discarded_without_touching_the_session() {
        let (mut a, _b, t) = up_pair(100);
        let before = (a.state, a.remote_disc, a.detect_deadline);
        for bytes in [&[][..], &[0x20; 10], &[0xff; 24], &[0x20, 0xc0, 0, 24]] {
            assert!(a.receive(bytes, t).is_err());
        }
        assert_eq!((a.state, a.remote_disc, a.detect_deadline), before);
    }
}
