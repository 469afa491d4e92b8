//! Sysctls under /proc/sys, which follow the caller's network namespace.

use std::io;
use std::path::PathBuf;

fn full(path: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(path)
}

/// Reads each path; `None` for a file that does not exist.
pub fn read_many(paths: &[String]) -> Vec<(String, Option<String>)> {
    paths
        .iter()
        .map(|p| {
            (
                p.clone(),
                std::fs::read_to_string(full(p))
                    .ok()
                    .map(|v| v.trim().to_string()),
            )
        })
        .collect()
}

pub fn write(path: &str, value: &str) -> io::Result<()> {
    std::fs::write(full(path), value.as_bytes())
}
