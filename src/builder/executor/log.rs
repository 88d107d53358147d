//! Supervising a running builder: its combined stdout/stderr goes to a log file (up to a size
//! limit), the build timeout and max-silent-time are enforced, and the whole process group is
//! SIGKILLed when a limit is hit, when the build is cancelled, or when the builder's main process
//! exits (leftover background processes die with it, as in Nix).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::spawn::Process;

/// How many lines of the log's end a failure reports.
pub const TAIL_LINES: usize = 20;
/// How many bytes of the log's end are kept in memory for that.
const TAIL_BYTES: usize = 64 * 1024;

/// Which limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeLimit {
    /// The whole build took longer than this.
    Timeout(Duration),
    /// The builder wrote nothing for this long.
    MaxSilent(Duration),
}

/// How the builder ended.
#[derive(Debug)]
pub enum Outcome {
    Exited(ExitStatus),
    TimedOut(TimeLimit),
    LogLimitExceeded(u64),
    Cancelled,
}

/// The supervision's result.
#[derive(Debug)]
pub struct Supervised {
    pub outcome: Outcome,
    /// The last lines of the log (at most [`TAIL_LINES`]).
    pub tail: Vec<String>,
    pub log_bytes: u64,
}

/// Limits, all optional.
#[derive(Debug, Clone, Copy, Default)]
pub struct SuperviseLimits {
    pub timeout: Option<Duration>,
    pub max_silent: Option<Duration>,
    pub max_log_bytes: Option<u64>,
}

/// SIGKILLs process group `pgid` (ignoring "no such process").
pub fn kill_group(pgid: i32) {
    if pgid > 0 {
        // SAFETY: kill(2) with a negative pid signals a process group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

struct Tail {
    buf: VecDeque<u8>,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend(data);
        let excess = self.buf.len().saturating_sub(TAIL_BYTES);
        self.buf.drain(..excess);
    }

    fn lines(&self) -> Vec<String> {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<String> = text
            .trim_end_matches('\n')
            .split('\n')
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        if lines.len() == 1 && lines[0].is_empty() {
            lines.clear();
        }
        let skip = lines.len().saturating_sub(TAIL_LINES);
        lines.drain(..skip);
        lines
    }
}

/// Supervises `child` (leader of process group `child.id()`), reading its output from `out`
/// into `log`. `cancel` becoming readable or hung up cancels the build.
pub fn supervise(
    child: &mut Process,
    out: OwnedFd,
    cancel: Option<&OwnedFd>,
    log: &mut File,
    limits: SuperviseLimits,
) -> io::Result<Supervised> {
    let pgid = child.id() as i32;
    let start = Instant::now();
    let mut last_output = start;
    let mut tail = Tail {
        buf: VecDeque::new(),
    };
    let mut log_bytes: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let pidfd = pidfd_open(child.id());
    let mut out_open = true;
    let mut status: Option<ExitStatus> = None;

    let finish = |outcome: Outcome, tail: &Tail, log_bytes: u64| Supervised {
        outcome,
        tail: tail.lines(),
        log_bytes,
    };

    loop {
        if !out_open && status.is_some() {
            break;
        }
        if !out_open && pidfd.is_none() {
            // No way to wait with a timeout: the pipe is closed, so the builder is (nearly) done.
            status = Some(child.wait()?);
            kill_group(pgid);
            break;
        }
        let now = Instant::now();
        let mut wait: Option<Duration> = None;
        let mut expired: Option<TimeLimit> = None;
        if let Some(t) = limits.timeout {
            let deadline = start + t;
            match deadline.checked_duration_since(now) {
                Some(d) if !d.is_zero() => wait = Some(wait.map_or(d, |w: Duration| w.min(d))),
                _ => expired = Some(TimeLimit::Timeout(t)),
            }
        }
        if let (Some(s), None) = (limits.max_silent, expired) {
            let deadline = last_output + s;
            match deadline.checked_duration_since(now) {
                Some(d) if !d.is_zero() => wait = Some(wait.map_or(d, |w: Duration| w.min(d))),
                _ => expired = Some(TimeLimit::MaxSilent(s)),
            }
        }
        if let Some(limit) = expired {
            kill_group(pgid);
            let _ = child.wait();
            return Ok(finish(Outcome::TimedOut(limit), &tail, log_bytes));
        }

        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
        let out_idx = out_open.then(|| {
            fds.push(libc::pollfd {
                fd: out.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.len() - 1
        });
        let pid_idx = match (&pidfd, status) {
            (Some(p), None) => {
                fds.push(libc::pollfd {
                    fd: p.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                Some(fds.len() - 1)
            }
            _ => None,
        };
        let cancel_idx = cancel.map(|c| {
            fds.push(libc::pollfd {
                fd: c.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.len() - 1
        });
        let timeout_ms: i32 = match wait {
            // Round up so a deadline is never polled for just short of it.
            Some(d) => i32::try_from(d.as_millis() + 1).unwrap_or(i32::MAX),
            None => -1,
        };
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            kill_group(pgid);
            let _ = child.wait();
            return Err(e);
        }
        if cancel_idx.is_some_and(|i| fds[i].revents != 0) {
            kill_group(pgid);
            let _ = child.wait();
            return Ok(finish(Outcome::Cancelled, &tail, log_bytes));
        }
        if out_idx.is_some_and(|i| fds[i].revents != 0) {
            // SAFETY: reading into a live buffer from a descriptor we own.
            let n = unsafe { libc::read(out.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted && e.kind() != io::ErrorKind::WouldBlock {
                    kill_group(pgid);
                    let _ = child.wait();
                    return Err(e);
                }
            } else if n == 0 {
                out_open = false;
            } else {
                let data = &buf[..n as usize];
                last_output = Instant::now();
                let (keep, over) = match limits.max_log_bytes {
                    Some(max) if log_bytes + data.len() as u64 > max => {
                        (&data[..(max - log_bytes.min(max)) as usize], true)
                    }
                    _ => (data, false),
                };
                if let Err(e) = log.write_all(keep) {
                    kill_group(pgid);
                    let _ = child.wait();
                    return Err(e);
                }
                tail.push(keep);
                log_bytes += keep.len() as u64;
                if over {
                    kill_group(pgid);
                    let _ = child.wait();
                    let max = limits.max_log_bytes.unwrap_or(0);
                    return Ok(finish(Outcome::LogLimitExceeded(max), &tail, log_bytes));
                }
            }
        }
        if pid_idx.is_some_and(|i| fds[i].revents != 0) {
            status = Some(child.wait()?);
            // The builder is done: whatever it left running goes too (and releases the pipe).
            kill_group(pgid);
        }
    }
    let status = match status {
        Some(s) => s,
        None => child.wait()?,
    };
    Ok(finish(Outcome::Exited(status), &tail, log_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let mut t = Tail {
            buf: VecDeque::new(),
        };
        assert!(t.lines().is_empty());
        for i in 0..30 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.push(b"partial");
        let l = t.lines();
        assert_eq!(l.len(), TAIL_LINES);
        assert_eq!(l[0], "line 11");
        assert_eq!(l[19], "partial");
    }
}
