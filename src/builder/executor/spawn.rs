//! Starting a builder without copying the runner: `clone(CLONE_VM | CLONE_VFORK)`, as
//! `posix_spawn` does, with the set-up a builder needs (its own session, the parent-death signal,
//! the sandbox's namespaces and mounts) run in the child before `execve`.
//!
//! `fork` of the runner (many threads, the actors' heap, SQLite's caches) copies its page tables,
//! marks every page copy-on-write and shoots down the TLBs of its other threads, and the copy is
//! torn down again at `exec`; in `scripts/bench-vs-nix` that was the largest per-build cost left
//! that was the runner's own. Here the child runs on a stack of its own in the parent's memory
//! while the calling thread waits, until the child has exec'd or failed.
//!
//! The child shares the parent's memory, so it only makes system calls on data prepared before:
//! no allocation, no locks, no unwinding. It resets every signal handler to the default before it
//! unblocks signals (the parent blocks them around the clone), so no handler of the runner runs
//! in it.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use super::sandbox::cloexec_pipe;

/// What the child runs before `execve` besides the usual (for the sandbox); system calls only.
pub type Setup<'a> = &'a dyn Fn() -> io::Result<()>;

/// A builder to start.
pub struct Spawn<'a> {
    /// The builder, exec'd as given (no `PATH` search, as Nix does).
    pub program: CString,
    /// `argv`, `argv[0]` included.
    pub argv: Vec<CString>,
    /// The whole environment, `NAME=value`.
    pub env: Vec<CString>,
    /// Where to start (`None`: the set-up chooses, e.g. the sandbox's chdir).
    pub cwd: Option<CString>,
    /// Standard output and error of the builder (standard input is `/dev/null`).
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
    pub setup: Option<Setup<'a>>,
}

/// A started builder: its pid, reaped by [`Process::wait`].
#[derive(Debug)]
pub struct Process {
    pid: libc::pid_t,
}

impl Process {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Waits for it to exit and reaps it.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        let mut status: c_int = 0;
        loop {
            // SAFETY: waitpid on our own child with a valid out-parameter.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                return Ok(ExitStatus::from_raw(status));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// What the child reads: everything as raw pointers into the parent's memory.
struct ChildArgs<'a> {
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: Option<*const c_char>,
    devnull: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    setup: Option<Setup<'a>>,
    /// Where the child reports the errno of what failed (close-on-exec: closed by `execve`).
    report: RawFd,
}

const STACK: usize = 256 * 1024;

/// The pointers `execve` takes: one per string, then a null.
fn null_terminated(v: &[CString]) -> Vec<*const c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain([std::ptr::null()])
        .collect()
}

/// Starts the builder; returns once it has exec'd, or the error of the step that failed in the
/// child (the errno of `execve` itself: `ENOENT` for a builder that is not there).
pub fn spawn(s: &Spawn<'_>) -> io::Result<Process> {
    let argv = null_terminated(&s.argv);
    let envp = null_terminated(&s.env);
    let devnull: &CStr = c"/dev/null";
    // SAFETY: open of a NUL-terminated path.
    let fd = unsafe { libc::open(devnull.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let devnull: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let (report_r, report_w) = cloexec_pipe()?;
    let args = ChildArgs {
        program: s.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: s.cwd.as_ref().map(|c| c.as_ptr()),
        devnull: devnull.as_raw_fd(),
        stdout: s.stdout.as_raw_fd(),
        stderr: s.stderr.as_raw_fd(),
        setup: s.setup,
        report: report_w.as_raw_fd(),
    };
    let mut stack = vec![0u8; STACK];
    // The stack grows down: its top, 16-byte aligned.
    let top = {
        let end = stack.as_mut_ptr() as usize + STACK;
        (end & !15) as *mut c_void
    };
    // SAFETY: all signals blocked on this thread around the clone (restored below), so none is
    // handled in the child before it resets the handlers; `args`, `argv`, `envp` and the stack
    // outlive the child's use of them (the parent is suspended until it has exec'd or exited).
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&args as *const ChildArgs<'_>).cast_mut().cast(),
        );
        let e = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(e);
        }
        pid
    };
    drop(stack);
    drop(report_w);
    let mut process = Process { pid };
    let mut errno = [0u8; 4];
    let n = loop {
        // SAFETY: reading into a stack buffer from a descriptor we own; the child is past exec.
        let n = unsafe { libc::read(report_r.as_raw_fd(), errno.as_mut_ptr().cast(), errno.len()) };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break n;
        }
    };
    if n == 4 {
        process.wait()?;
        return Err(io::Error::from_raw_os_error(i32::from_le_bytes(errno)));
    }
    Ok(process)
}

/// The child: signals to their defaults and unblocked (as `std::process::Command` leaves them),
/// standard descriptors, session, parent-death signal, the set-up, then `execve`.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildArgs` of `spawn`, alive while the parent waits for us.
    let a = unsafe { &*(arg as *const ChildArgs<'_>) };
    let fail = |a: &ChildArgs<'_>| -> c_int {
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let b = e.to_le_bytes();
        // SAFETY: a 4-byte write from the stack, then exit without running anything of the
        // parent's (no atexit handlers, no stdio flush).
        unsafe {
            libc::write(a.report, b.as_ptr().cast(), b.len());
            libc::_exit(127)
        }
    };
    // SAFETY (all below): system calls on descriptors and NUL-terminated strings prepared by
    // the parent.
    unsafe {
        // Every handler back to the default: the runner's must not run here.
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut sa) == 0
                && sa.sa_sigaction != libc::SIG_DFL
            {
                // An ignored signal stays ignored across exec, except SIGPIPE (which the Rust
                // runtime ignores for itself).
                if sa.sa_sigaction == libc::SIG_IGN && sig != libc::SIGPIPE {
                    continue;
                }
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
            return fail(a);
        }
        for (from, to) in [(a.devnull, 0), (a.stdout, 1), (a.stderr, 2)] {
            if libc::dup2(from, to) < 0 {
                return fail(a);
            }
        }
        if libc::setsid() < 0 {
            return fail(a);
        }
        // If the runner dies (even by SIGKILL), so does the builder: a restarted runner never
        // races an orphaned build for the same scratch paths. The thread that clones is the one
        // that supervises the build, so it lives as long as the builder does.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
            return fail(a);
        }
        if let Some(setup) = a.setup
            && setup().is_err()
        {
            return fail(a);
        }
        if let Some(cwd) = a.cwd
            && libc::chdir(cwd) < 0
        {
            return fail(a);
        }
        libc::execve(a.program, a.argv, a.envp);
        fail(a)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn cs(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    /// Runs `script` under `/bin/sh` and gives its exit status and output.
    fn run(script: &str, setup: Option<Setup<'_>>) -> io::Result<(ExitStatus, String)> {
        let (r, w) = cloexec_pipe()?;
        let mut p = spawn(&Spawn {
            program: cs("/bin/sh"),
            argv: vec![cs("sh"), cs("-c"), cs(script)],
            env: vec![cs("X=from the env"), cs("PATH=/usr/bin:/bin")],
            cwd: Some(cs("/")),
            stdout: &w,
            stderr: &w,
            setup,
        })?;
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out)?;
        Ok((p.wait()?, out))
    }

    #[test]
    fn a_builder_gets_its_args_env_cwd_and_a_clean_signal_state() {
        let (status, out) = run(
            "echo $X; pwd; cat /proc/self/status | grep -E '^Sig(Blk|Ign|Cgt):'; read l || echo stdin-empty; exit 3",
            None,
        )
        .unwrap();
        assert_eq!(status.code(), Some(3));
        let mut lines = out.lines();
        assert_eq!(
            [lines.next(), lines.next()],
            [Some("from the env"), Some("/")]
        );
        let mask = |name: &str, line: Option<&str>| {
            let hex = line.and_then(|l| l.strip_prefix(name)).unwrap().trim();
            u64::from_str_radix(hex, 16).unwrap()
        };
        // Nothing blocked (the parent blocks every signal around the clone); SIGPIPE, which the
        // Rust runtime ignores in the parent, back to its default.
        assert_eq!(mask("SigBlk:", lines.next()), 0);
        let sigpipe = 1u64 << (libc::SIGPIPE - 1);
        assert_eq!(mask("SigIgn:", lines.next()) & sigpipe, 0);
        assert!(lines.next().is_some_and(|l| l.starts_with("SigCgt:")));
        assert_eq!(lines.next(), Some("stdin-empty"));
    }

    #[test]
    fn a_missing_builder_or_a_failing_setup_is_an_error_of_the_spawn() {
        let (_, w) = cloexec_pipe().unwrap();
        let e = spawn(&Spawn {
            program: cs("/nonexistent/builder"),
            argv: vec![cs("builder")],
            env: vec![],
            cwd: None,
            stdout: &w,
            stderr: &w,
            setup: None,
        })
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let failing = || -> io::Result<()> {
            // SAFETY: chdir to a NUL-terminated path that does not exist.
            if unsafe { libc::chdir(c"/nonexistent".as_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        let e = run("echo never", Some(&failing)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
