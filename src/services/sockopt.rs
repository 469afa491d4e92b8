//! `sendmsg`/`recvmsg` with the ancillary data the services need and the
//! standard library does not offer: a chosen source address and output
//! interface (`IP_PKTINFO`, `IPV6_PKTINFO`) and the received hop limit
//! (`IPV6_HOPLIMIT`, RFC 4861 §6.1.1) or TTL (`IP_TTL`, GTSM for BFD).
//! Thin wrappers over libc; all decisions live in the callers.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Room for one `in6_pktinfo` or `in_pktinfo` or an int, with alignment.
const CMSG_SPACE: usize = 64;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

/// Sends `buf` to `dst` from `src` out of `ifindex` (`IP_PKTINFO`).
pub fn send_v4(
    fd: RawFd,
    buf: &[u8],
    dst: SocketAddrV4,
    src: Ipv4Addr,
    ifindex: u32,
) -> io::Result<usize> {
    let mut addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dst.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let info = libc::in_pktinfo {
        ipi_ifindex: ifindex as libc::c_int,
        ipi_spec_dst: libc::in_addr {
            s_addr: u32::from(src).to_be(),
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    send_with(
        fd,
        buf,
        (&mut addr as *mut libc::sockaddr_in).cast(),
        mem::size_of::<libc::sockaddr_in>(),
        libc::IPPROTO_IP,
        libc::IP_PKTINFO,
        &info,
    )
}

/// Sends `buf` to `dst` from `src` out of `ifindex` (`IPV6_PKTINFO`).
pub fn send_v6(
    fd: RawFd,
    buf: &[u8],
    dst: SocketAddrV6,
    src: Ipv6Addr,
    ifindex: u32,
) -> io::Result<usize> {
    let mut addr = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: dst.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: dst.ip().octets(),
        },
        sin6_scope_id: ifindex,
    };
    let info = libc::in6_pktinfo {
        ipi6_addr: libc::in6_addr {
            s6_addr: src.octets(),
        },
        ipi6_ifindex: ifindex,
    };
    send_with(
        fd,
        buf,
        (&mut addr as *mut libc::sockaddr_in6).cast(),
        mem::size_of::<libc::sockaddr_in6>(),
        libc::IPPROTO_IPV6,
        libc::IPV6_PKTINFO,
        &info,
    )
}

fn send_with<T>(
    fd: RawFd,
    buf: &[u8],
    addr: *mut libc::c_void,
    addr_len: usize,
    level: libc::c_int,
    kind: libc::c_int,
    data: &T,
) -> io::Result<usize> {
    let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; every pointer set below points
    // into locals that outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = addr;
    msg.msg_namelen = addr_len as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE(mem::size_of::<T>() as u32) } as usize;
    assert!(space <= CMSG_SPACE, "control buffer too small");
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` writable, aligned bytes, so the
    // first header and its data (CMSG_LEN(size_of T) <= space) fit.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = level;
        (*c).cmsg_type = kind;
        (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<T>() as u32) as _;
        std::ptr::copy_nonoverlapping(
            (data as *const T).cast::<u8>(),
            libc::CMSG_DATA(c),
            mem::size_of::<T>(),
        );
    }
    // SAFETY: msg is fully initialised and valid for the call; fd is a
    // socket owned by the caller.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One datagram received on an IPv6 socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received6 {
    pub len: usize,
    /// The datagram was longer than the buffer.
    pub truncated: bool,
    pub from: SocketAddrV6,
    /// From `IPV6_HOPLIMIT` (needs `IPV6_RECVHOPLIMIT`).
    pub hop_limit: Option<u8>,
}

/// Receives one datagram without blocking (`MSG_DONTWAIT`).
pub fn recv_v6(fd: RawFd, buf: &mut [u8]) -> io::Result<Received6> {
    // SAFETY: an all-zero sockaddr_in6 is valid.
    let mut addr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    let (len, truncated, hop_limit) = recv_with(
        fd,
        buf,
        (&mut addr as *mut libc::sockaddr_in6).cast(),
        mem::size_of::<libc::sockaddr_in6>(),
        (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT),
    )?;
    Ok(Received6 {
        len,
        truncated,
        from: SocketAddrV6::new(
            Ipv6Addr::from(addr.sin6_addr.s6_addr),
            u16::from_be(addr.sin6_port),
            0,
            addr.sin6_scope_id,
        ),
        hop_limit,
    })
}

/// One datagram received on an IPv4 socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received4 {
    pub len: usize,
    pub truncated: bool,
    pub from: SocketAddrV4,
    /// From `IP_TTL` (needs `IP_RECVTTL`).
    pub ttl: Option<u8>,
}

/// Receives one datagram without blocking (`MSG_DONTWAIT`).
pub fn recv_v4(fd: RawFd, buf: &mut [u8]) -> io::Result<Received4> {
    // SAFETY: an all-zero sockaddr_in is valid.
    let mut addr: libc::sockaddr_in = unsafe { mem::zeroed() };
    let (len, truncated, ttl) = recv_with(
        fd,
        buf,
        (&mut addr as *mut libc::sockaddr_in).cast(),
        mem::size_of::<libc::sockaddr_in>(),
        (libc::IPPROTO_IP, libc::IP_TTL),
    )?;
    Ok(Received4 {
        len,
        truncated,
        from: SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        ),
        ttl,
    })
}

/// `recvmsg` into `buf`, the source address into `addr` (`addr_len` bytes
/// of a sockaddr) and the int of control message `want` (level, type) if
/// present; returns (length, truncated, that int).
fn recv_with(
    fd: RawFd,
    buf: &mut [u8],
    addr: *mut libc::c_void,
    addr_len: usize,
    want: (libc::c_int, libc::c_int),
) -> io::Result<(usize, bool, Option<u8>)> {
    let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below point
    // into locals (and the caller's sockaddr) that outlive the call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = addr;
    msg.msg_namelen = addr_len as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE as _;
    // SAFETY: msg describes valid writable buffers of the given lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut value = None;
    // SAFETY: the kernel filled msg_control/msg_controllen; the CMSG_*
    // macros walk only within it, and we read an int only from a header
    // whose length says it holds one.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if ((*c).cmsg_level, (*c).cmsg_type) == want
                && (*c).cmsg_len as usize
                    >= libc::CMSG_LEN(mem::size_of::<libc::c_int>() as u32) as usize
            {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                value = u8::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let n = n as usize;
    let truncated = n > buf.len() || msg.msg_flags & libc::MSG_TRUNC != 0;
    Ok((n.min(buf.len()), truncated, value))
}

/// `setsockopt` of one int.
pub fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: fd is a socket owned by the caller; value outlives the call
    // and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The MAC address of interface `name` (from sysfs), if it has one.
pub fn mac_of(name: &str) -> Option<[u8; 6]> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).ok()?;
    s.trim().parse::<crate::intent::MacAddr>().ok().map(|m| m.0)
}
