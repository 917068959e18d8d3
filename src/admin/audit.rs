//! The append-only audit log (R24): one JSON line per change to an organisation or account.
//!
//! The file is opened with `O_APPEND`, created with mode 0600, and every batch of records is
//! fsynced before the API answers. A rotated or deleted file is noticed (by inode) and the
//! log is reopened at the configured path.

use serde::Serialize;
use serde_json::Value;
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

/// One line of the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub time: String,
    /// The token name that made the change.
    pub actor: String,
    /// `org.create`, `org.cease`, `org.relays`, `user.create`, `user.import`, `user.suspend`,
    /// `user.restore`, `user.activate`, `user.withdraw`, `user.permit` (bulk permission),
    /// `user.limits_reset` (R14 counters), `user.quota` (R13), `user.delegate` and
    /// `user.undelegate` (R8 send-as delegation; object: the mailbox), `user.lock`, `user.unlock`
    /// (R15). The daemon's own changes have the actor `mailwarden`: automatic locks (R15) and
    /// withdrawals for inactivity (R20).
    pub action: &'static str,
    /// Organisation code or account address.
    pub object: String,
    /// The record before the change (`null` for a creation).
    pub before: Value,
    /// The record after the change.
    pub after: Value,
    pub reason: Option<String>,
    /// The API client's IP address (`null` over a Unix socket).
    pub client_ip: Option<String>,
}

#[derive(Default)]
pub struct AuditLog {
    open: Mutex<Option<(PathBuf, File)>>,
}

impl AuditLog {
    pub fn new() -> Arc<AuditLog> {
        Arc::new(AuditLog::default())
    }

    /// Makes sure the log at `path` is open and writable, before a change is made.
    pub async fn ready(self: &Arc<Self>, path: &Path) -> io::Result<()> {
        let me = self.clone();
        let path = path.to_owned();
        blocking(move || {
            let mut open = me.open.lock().unwrap_or_else(|p| p.into_inner());
            me.ensure_open(&mut open, &path).map(|_| ())
        })
        .await
    }

    /// Appends `records` as JSON lines and fsyncs them.
    pub async fn append(
        self: &Arc<Self>,
        path: &Path,
        records: Vec<AuditRecord>,
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        for r in &records {
            serde_json::to_writer(&mut buf, r).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        let me = self.clone();
        let path = path.to_owned();
        blocking(move || {
            let mut open = me.open.lock().unwrap_or_else(|p| p.into_inner());
            let file = me.ensure_open(&mut open, &path)?;
            let res = file.write_all(&buf).and_then(|_| file.sync_data());
            if res.is_err() {
                // Reopen next time rather than keep a broken handle.
                *open = None;
            }
            res
        })
        .await
    }

    fn ensure_open<'a>(
        &self,
        open: &'a mut Option<(PathBuf, File)>,
        path: &Path,
    ) -> io::Result<&'a mut File> {
        let current = match open.as_ref() {
            Some((p, f)) if p == path => {
                // Still the same file at that path (not rotated or removed)?
                match (std::fs::metadata(path), f.metadata()) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                    _ => false,
                }
            }
            _ => false,
        };
        if !current {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "cannot create the directory of audit log {} (admin.audit_log): {e}",
                            path.display()
                        ),
                    )
                })?;
            }
            let f = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "cannot open audit log {} (admin.audit_log): {e}",
                            path.display()
                        ),
                    )
                })?;
            *open = Some((path.to_owned(), f));
        }
        Ok(&mut open.as_mut().expect("just opened").1)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("audit writer failed: {e}"))))
}
