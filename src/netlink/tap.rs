//! Persistent tap creation with the TUNSETIFF / TUNSETPERSIST ioctls.
//!
//! Written by hand because the kernel refuses tun/tap creation over
//! rtnetlink ("tun/tap creation via rtnetlink is not supported") and the tap
//! crates either lack TUNSETPERSIST or pull in an async runtime of their own
//! for an fd we close at once. libvirt then opens the tap with
//! `managed='no'` using the same flags (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`,
//! plus `IFF_MULTI_QUEUE` when queues > 1): a mismatch gives EINVAL there.

use std::ffi::CString;
use std::io;

/// Creates `name` as a persistent tap and closes our fd, so QEMU can attach.
pub fn create(name: &str, multi_queue: bool) -> io::Result<()> {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    create_with(name, flags)
}

/// Creates `name` as a persistent layer-3 tun that nobody ever opens: a
/// device whose every transmitted packet is dropped (counted in its
/// tx_dropped), with no ARP. Routes through it are what proxy ARP needs to
/// answer for a whole subnet (`FabricConfig::arp_whole_subnet`); `lo`
/// cannot be used, since a packet routed out of `lo` keeps its route and
/// loops until its TTL runs out. (The kernel here has no dummy module.)
pub fn create_sink(name: &str) -> io::Result<()> {
    create_with(name, libc::IFF_TUN | libc::IFF_NO_PI)
}

fn create_with(name: &str, flags: libc::c_int) -> io::Result<()> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if cname.as_bytes().len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: a NUL-terminated constant path and valid flags.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(cname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: fd is an open tun fd and ifr lives across the calls; the
    // ioctl request numbers and argument types match drivers/net/tun.c.
    let result = unsafe {
        if libc::ioctl(fd, libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) < 0
            || libc::ioctl(fd, libc::TUNSETPERSIST, 1 as libc::c_ulong) < 0
        {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: fd was opened above and is closed exactly once.
    unsafe { libc::close(fd) };
    result
}

/// The ifindex of `name` in this network namespace, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    // SAFETY: cname is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    (idx != 0).then_some(idx)
}
