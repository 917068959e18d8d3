//! Process plumbing for the end-to-end tests: signals, waiting for exits, free ports, and
//! waiting for conditions that no process announces.

use rustix::process::{Pid, PidfdFlags, Signal};
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use rustix::process::Signal as Sig;

/// A loopback port that was free a moment ago. Whoever binds it next must retry on
/// "address in use": another test may have taken it in between.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn pid(raw: u32) -> Pid {
    Pid::from_raw(raw as i32).expect("pid is not 0")
}

/// Sends `sig` to process `raw`; false when the process is gone.
pub fn signal(raw: u32, sig: Signal) -> bool {
    rustix::process::kill_process(pid(raw), sig).is_ok()
}

/// Waits until process `raw` (not necessarily our child) exits, up to `timeout`, without
/// polling: a pidfd becomes readable when the process terminates. True when it has exited.
pub fn wait_exit(raw: u32, timeout: Duration) -> bool {
    let fd = match rustix::process::pidfd_open(pid(raw), PidfdFlags::empty()) {
        Ok(fd) => fd,
        // ESRCH: already gone.
        Err(_) => return true,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ts = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => panic!("poll pidfd: {e}"),
        }
    }
}

/// Stops process `raw`: SIGTERM, then SIGKILL if it is still there after `grace`.
pub fn terminate(raw: u32, grace: Duration) {
    if signal(raw, Sig::TERM) && !wait_exit(raw, grace) {
        signal(raw, Sig::KILL);
        wait_exit(raw, Duration::from_secs(5));
    }
}

/// Re-checks `probe` until it yields a value or `timeout` passes (then panics naming `what`).
///
/// Only for facts no process announces: a file another program writes (the ready file,
/// smtp-sink's dumps) or a counter on `/metrics`. The short pause between checks is not a
/// guess at how long something takes; the deadline is only a failure bound.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A temporary directory that processes running as other users (Postfix's `postfix` user,
/// smtp-sink after `-u`) can traverse. Kept (and its path printed) when the test fails.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new(prefix: &str) -> TestDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        TestDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("dir present").path()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path().join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                eprintln!("(kept {} for inspection)", d.keep().display());
            }
        }
    }
}

/// The last `max` bytes of a file, for failure output.
pub fn tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            String::from_utf8_lossy(&b[start..]).into_owned()
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Finds a program in the usual places (Debian puts Postfix's helpers in different ones
/// across versions) or on `PATH`.
pub fn find_program(name: &str, extra_dirs: &[&str]) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = extra_dirs
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not found (looked in {extra_dirs:?} and PATH); the e2e tests need \
         `apt-get install postfix swaks` (see .ci/run)"
    );
}
