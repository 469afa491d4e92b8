//! Helpers for unit tests that need the kernel.

/// Runs `f` on a thread of its own in a new network namespace (only
/// its loopback, up), on a current-thread runtime: the test's TCP
/// never touches the machine's namespaces, and the namespace goes
/// with the thread.
pub(crate) fn in_private_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        // SAFETY: unshare(2) with CLONE_NEWNET changes only the
        // calling thread's network namespace; no memory is involved.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip link set lo up");
        assert!(up.success());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f());
    })
    .join()
    .expect("test thread");
}
