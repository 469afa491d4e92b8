//! Persistence of the intent: `<state_dir>/intent.json`, versioned, written
//! atomically (temp file, fsync, rename, fsync of the directory).
//!
//! A file that cannot be read as this version is never overwritten: loading
//! fails with a clear error, a copy is kept aside, and the agent refuses to
//! start (so it cannot sweep the kernel state of VMs it no longer knows).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::Intent;

/// The on-disk format version this build reads and writes.
pub const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("intent file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "intent file {path} is corrupt ({reason}); a copy was kept as {kept}. \
         Refusing to start: repair or remove the file (removing it makes l3hvd \
         sweep the kernel state of every VM it owned)"
    )]
    Corrupt {
        path: PathBuf,
        reason: String,
        kept: PathBuf,
    },
    #[error(
        "intent file {path} has format version {found}, this l3hvd reads version {VERSION}; \
         a copy was kept as {kept}. Refusing to start"
    )]
    UnknownVersion {
        path: PathBuf,
        found: u64,
        kept: PathBuf,
    },
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    #[serde(flatten)]
    intent: Intent,
}

/// The intent file of one state directory.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// Opens the store, creating the state directory (mode 0700) if needed.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| StoreError::Dir {
                path: state_dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: state_dir.join("intent.json"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the intent; a missing file is an empty intent.
    pub fn load(&self) -> Result<Intent, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Intent::default()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let value: serde_json::Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return Err(self.corrupt(e.to_string())),
        };
        let version = value.get("version").and_then(|v| v.as_u64());
        match version {
            Some(v) if v == u64::from(VERSION) => {}
            Some(found) => {
                let kept = self.keep_aside()?;
                return Err(StoreError::UnknownVersion {
                    path: self.path.clone(),
                    found,
                    kept,
                });
            }
            None => return Err(self.corrupt("no \"version\" field".into())),
        }
        match serde_json::from_value::<OnDisk>(value) {
            Ok(d) => Ok(d.intent),
            Err(e) => Err(self.corrupt(e.to_string())),
        }
    }

    fn corrupt(&self, reason: String) -> StoreError {
        match self.keep_aside() {
            Ok(kept) => StoreError::Corrupt {
                path: self.path.clone(),
                reason,
                kept,
            },
            Err(e) => e,
        }
    }

    /// Copies the current file to `intent.json.bad-<unix time>`; the
    /// original stays so a restart refuses again instead of sweeping.
    fn keep_aside(&self) -> Result<PathBuf, StoreError> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let kept = self.path.with_extension(format!("json.bad-{secs}"));
        fs::copy(&self.path, &kept).map_err(|source| StoreError::Io {
            path: kept.clone(),
            source,
        })?;
        Ok(kept)
    }

    /// Writes the intent atomically: a reader (or a crash) sees the old file
    /// or the new one, never a mix.
    ///
    /// The new file's data is made durable before the rename (so a crash
    /// of the machine never leaves an empty or partial file in its place);
    /// the rename itself is not (no fsync of the directory). What that
    /// could lose is only which of the two whole files a machine crash
    /// leaves: the last change before the crash. Either file then lists
    /// VMs that died with their hypervisor; what runs after the reboot is
    /// set again by libvirt's hooks (and the agent's domain reconcile when
    /// `[libvirt]` is enabled) or by the orchestrator, with or without it. The agent answers a VM's `prepare` only
    /// once this returns, and the directory's fsync was one of two disk
    /// flushes on that path (about 1 ms here; perf sched showed the answer
    /// waiting for it after the kernel work was done).
    pub fn save(&self, intent: &Intent) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        let doc = OnDisk {
            version: VERSION,
            intent: intent.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&doc).map_err(|e| io(e.into()))?;
        bytes.push(b'\n');
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_data().map_err(io)?;
        }
        fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::{InterfaceIntent, LinkMode, VmIntent};

    fn sample() -> Intent {
        let mut i = Intent::default();
        i.vms.insert(
            "vm1".into(),
            VmIntent {
                name: "vm1".into(),
                interfaces: vec![InterfaceIntent {
                    name: "tap1".into(),
                    mac: "52:54:00:00:00:01".parse().unwrap(),
                    fabric: "public".into(),
                    link: LinkMode::Tap,
                    ipv4: vec!["203.0.113.1".parse().unwrap()],
                    ipv6: vec!["2001:db8:cb00:7100::1".parse().unwrap()],
                    ipv6_prefixes: vec![],
                    routed: vec![],
                }],
            },
        );
        i
    }

    #[test]
    fn missing_file_is_empty() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("state")).unwrap();
        assert_eq!(s.load().unwrap(), Intent::default());
    }

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.save(&sample()).unwrap();
        assert_eq!(s.load().unwrap(), sample());
        assert!(!d.path().join("intent.json.tmp").exists());
    }

    #[test]
    fn corrupt_file_is_refused_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        fs::write(s.path(), b"{\"version\": 1, \"vms\": {").unwrap();
        let e = s.load().unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        // Original untouched, a copy kept aside.
        assert_eq!(fs::read(s.path()).unwrap(), b"{\"version\": 1, \"vms\": {");
        let kept: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".bad-"))
            .collect();
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn unknown_version_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        fs::write(s.path(), b"{\"version\": 7, \"vms\": {}}").unwrap();
        assert!(matches!(
            s.load().unwrap_err(),
            StoreError::UnknownVersion { found: 7, .. }
        ));
    }

    #[test]
    fn wrong_shape_is_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        fs::write(s.path(), b"{\"version\": 1, \"vms\": {\"x\": 3}}").unwrap();
        assert!(matches!(s.load().unwrap_err(), StoreError::Corrupt { .. }));
    }
}
