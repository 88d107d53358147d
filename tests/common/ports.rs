//! Loopback ports for the processes a test starts, handed out race-free: a port goes to one
//! holder only, across the threads of a test binary and across test binaries running at the same
//! time, and it is never one the kernel hands out by itself.
//!
//! - Ports come from 20000–32767, below Linux's ephemeral range (32768–60999 by default), so no
//!   `bind(:0)` or outgoing connection of another process is given one meanwhile.
//! - A process-wide counter walks the range from an offset derived from the process id, so
//!   concurrent binaries start far apart.
//! - A port is claimed by an exclusive `flock` on `<tmp>/qr-test-ports/<port>.lock`, held until
//!   the process exits (the kernel drops it then, even after SIGKILL: no stale claims), so no other
//!   test process takes it; the port must also be bindable right now.
//! - Claimed ports are never given back within the process: a runner restarted on "its" port finds
//!   it still reserved for it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 20_000;
const LAST: u32 = 32_767;

/// Lock files held for the life of the process.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());
static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// A loopback port no one else holds: bindable now, and claimed for this process.
pub fn port() -> u16 {
    let span = LAST - FIRST + 1;
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let dir = std::env::temp_dir().join("qr-test-ports");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create the port lock dir {}: {e}", dir.display()));
    for _ in 0..span {
        let p = FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let path = dir.join(format!("{p}.lock"));
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
        let locked = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            continue; // another test process holds it
        }
        let port = p as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue; // in use outside the tests (the lock is dropped with `f`)
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(f);
        return port;
    }
    panic!("no free loopback port in {FIRST}-{LAST}");
}
