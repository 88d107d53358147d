//! The private mount namespace a builder runs in when the store's physical root differs from its
//! logical dir, as Nix does for chroot stores (`local?root=X`) and sandboxed builds:
//!
//! - the parent prepares the chroot: a skeleton shared by every build of the store root
//!   (`<root>/.qr-meta/sandboxes/<key>`, made once: the logical store dir, `/build`, `/tmp`,
//!   `/etc/{passwd,group,hosts}`, and mountpoints for `/bin`, `/usr`, `/lib`, `/lib64` (whichever
//!   exist here), `/dev` and `/proc`), and the build's own directory under the physical root
//!   (`<root>/.qr-chroot-…`): its store dir (writable: outputs land there) with one mountpoint per
//!   input path of the closure, and its `/tmp`;
//! - the child (between `clone` and `execve`, in the runner's memory: only system calls, no
//!   allocation; see `spawn.rs`) enters new user, mount, UTS, IPC (and, unless fixed-output,
//!   network) namespaces, maps its user to uid 1000 / gid 100 (Nix's sandbox ids), makes `/`
//!   private so nothing propagates back, bind-mounts the skeleton read-only and on it `/build`,
//!   `/tmp`, the build's store dir, the inputs (read-only) and the system directories
//!   (read-only), sets the hostname to `localhost`, and `chroot`s + `chdir`s to `/build`.
//!
//! Outputs are then picked up from the build's store dir (`<root>/.qr-chroot-…/store/…`);
//! anything else written there is a write outside the outputs. Failures name the step that
//! failed (via a pipe, since the child cannot allocate an error message).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::store::local::StagingDir;

/// The uid and gid builders see inside the sandbox (Nix's `sandboxUid`/`sandboxGid`).
pub const SANDBOX_UID: u32 = 1000;
pub const SANDBOX_GID: u32 = 100;
/// Where the build dir appears inside the sandbox (Nix's `sandbox-build-dir`).
pub const SANDBOX_BUILD_DIR: &str = "/build";

#[derive(Debug)]
struct Bind {
    src: CString,
    dst: CString,
    recursive: bool,
    readonly: bool,
    /// Flags of the source mount that must be kept on a read-only remount (locked in a user
    /// namespace).
    keep_flags: libc::c_ulong,
    desc: String,
}

/// A prepared chroot (see the module doc).
#[derive(Debug)]
pub struct Sandbox {
    chroot: StagingDir,
    store_in_chroot: PathBuf,
    binds: Vec<Bind>,
    chroot_c: CString,
    build_dir_c: CString,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    private_network: bool,
}

fn io_ctx(what: &str, p: &Path) -> impl FnOnce(io::Error) -> io::Error {
    let msg = format!("{what} {}", p.display());
    move |e| io::Error::new(e.kind(), format!("{msg}: {e}"))
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn mount_flags_of(p: &Path) -> libc::c_ulong {
    let Ok(c) = cstring(p) else { return 0 };
    // SAFETY: a zeroed statvfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let f = st.f_flag;
    let mut out: libc::c_ulong = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if f & st_flag != 0 {
            out |= ms_flag;
        }
    }
    out
}

/// Creates a mountpoint at `dst` of the same kind as `src` (directory or file). Returns false
/// for a symlink, which is copied instead (a bind mount would follow it).
fn mountpoint_like(src: &Path, dst: &Path) -> io::Result<bool> {
    let m = fs::symlink_metadata(src).map_err(io_ctx("reading", src))?;
    if m.file_type().is_symlink() {
        let target = fs::read_link(src).map_err(io_ctx("reading", src))?;
        std::os::unix::fs::symlink(target, dst).map_err(io_ctx("creating", dst))?;
        return Ok(false);
    }
    if m.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dst)
            .map_err(io_ctx("creating", dst))?;
    } else {
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io_ctx("creating", parent))?;
        }
        fs::write(dst, b"").map_err(io_ctx("creating", dst))?;
    }
    Ok(true)
}

/// What to put in a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec<'a> {
    /// The physical store root (the chroot is created in it, so outputs can be renamed out).
    pub root: &'a Path,
    /// The logical store dir.
    pub store_dir: &'a str,
    /// The build dir on the host (appears at `/build`).
    pub build_dir: &'a Path,
    /// Input paths: (base name, physical location).
    pub inputs: Vec<(String, PathBuf)>,
    /// System directories bound read-only: (path inside, path here); missing ones are skipped.
    pub system_paths: &'a [(String, PathBuf)],
    /// Fixed-output derivations keep the network.
    pub private_network: bool,
}

/// A system path to bind: (path inside, path here, read-only, a directory).
type SystemPath = (String, PathBuf, bool, bool);

/// Bumped whenever what a skeleton holds changes, so that an older runner's is not used.
const SKELETON_LAYOUT: &str = "qr-sandbox-skeleton-1";

/// The skeleton every sandbox of a store root with the same store dir and system paths shares,
/// made once: the mountpoints (`<store dir>`, `/build`, `/tmp`, `/dev`, `/proc`, the system
/// paths) and `/etc/{passwd,group,hosts}`. Each builder's namespace mounts it read-only and its
/// own store dir, build dir and `/tmp` on top, so a build creates (and later removes) four
/// entries on the host plus one per input, not two dozen: on a file system without a journal,
/// ext4 scans its inode tables past every recently deleted inode on each create, and the
/// per-build skeleton was the largest share of that.
fn skeleton(spec: &SandboxSpec<'_>, system: &[SystemPath]) -> io::Result<PathBuf> {
    use sha2::Digest;
    let mut key = sha2::Sha256::new();
    for part in [SKELETON_LAYOUT, spec.store_dir] {
        key.update(part.as_bytes());
        key.update([0]);
    }
    for (inside, _, _, is_dir) in system {
        key.update(inside.as_bytes());
        key.update([u8::from(*is_dir), 0]);
    }
    let dir = spec
        .root
        .join(crate::store::local::META_DIR)
        .join("sandboxes");
    let path = dir.join(crate::store::hash::to_hex(&key.finalize()[..10]));
    if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
        return Ok(path);
    }
    fs::create_dir_all(&dir).map_err(io_ctx("creating", &dir))?;
    // Made aside, then renamed into place: a skeleton that exists is whole.
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(&dir)
        .map_err(io_ctx("creating a directory in", &dir))?;
    let base = tmp.path();
    fs::set_permissions(base, fs::Permissions::from_mode(0o755)).map_err(io_ctx("chmod", base))?;
    let inside = |p: &str| base.join(p.trim_start_matches('/'));
    let mut dirs = vec![
        inside(spec.store_dir),
        inside(SANDBOX_BUILD_DIR),
        inside("/tmp"),
    ];
    let mut files = Vec::new();
    for (in_path, _, _, is_dir) in system {
        if *is_dir {
            dirs.push(inside(in_path));
        } else {
            files.push(inside(in_path));
        }
    }
    for d in &dirs {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(d)
            .map_err(io_ctx("creating", d))?;
    }
    for f in &files {
        if let Some(parent) = f.parent() {
            fs::create_dir_all(parent).map_err(io_ctx("creating", parent))?;
        }
        fs::write(f, b"").map_err(io_ctx("creating", f))?;
    }
    let etc = inside("/etc");
    fs::create_dir_all(&etc).map_err(io_ctx("creating", &etc))?;
    let etc_files = [
        (
            "passwd",
            format!(
                "root:x:0:0:Nix build user:{SANDBOX_BUILD_DIR}:/noshell\n\
                 nixbld:x:{SANDBOX_UID}:{SANDBOX_GID}:Nix build user:{SANDBOX_BUILD_DIR}:/noshell\n\
                 nobody:x:65534:65534:Nobody:/:/noshell\n"
            ),
        ),
        (
            "group",
            format!("root:x:0:\nnixbld:!:{SANDBOX_GID}:\nnogroup:x:65534:\n"),
        ),
        ("hosts", "127.0.0.1 localhost\n::1 localhost\n".to_string()),
    ];
    for (name, contents) in etc_files {
        let p = etc.join(name);
        fs::write(&p, contents).map_err(io_ctx("writing", &p))?;
    }
    match fs::rename(base, &path) {
        Ok(()) => Ok(path),
        // Another build made it first.
        Err(_) if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) => Ok(path),
        Err(e) => Err(io_ctx("renaming the sandbox skeleton to", &path)(e)),
    }
}

impl Sandbox {
    /// Prepares the chroot (parent side): the shared skeleton (made once) and this build's own
    /// store dir and `/tmp`.
    pub fn prepare(spec: &SandboxSpec<'_>) -> io::Result<Sandbox> {
        let mut system: Vec<SystemPath> = Vec::new();
        let all = spec
            .system_paths
            .iter()
            .map(|(i, h)| (i.clone(), h.clone(), true))
            .chain([
                ("/dev".to_string(), PathBuf::from("/dev"), false),
                ("/proc".to_string(), PathBuf::from("/proc"), false),
            ]);
        for (in_path, host, readonly) in all {
            // Follow a symlink on the host (e.g. /bin -> usr/bin): the mount does too.
            if let Ok(meta) = fs::metadata(&host) {
                system.push((in_path, host, readonly, meta.is_dir()));
            }
        }
        let skel = skeleton(spec, &system)?;
        let inside = |p: &str| skel.join(p.trim_start_matches('/'));

        let chroot =
            StagingDir::new(spec.root, "chroot").map_err(|e| io::Error::other(e.to_string()))?;
        let own = chroot.path().to_path_buf();
        let store_in_chroot = own.join("store");
        let tmp = own.join("tmp");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&store_in_chroot)
            .map_err(io_ctx("creating", &store_in_chroot))?;
        fs::create_dir(&tmp).map_err(io_ctx("creating", &tmp))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))
            .map_err(io_ctx("chmod", &tmp))?;

        // A store dir under /tmp (a test's, say) is mounted on this build's /tmp: its mountpoint
        // is made there.
        if let Ok(rest) = Path::new(spec.store_dir).strip_prefix("/tmp") {
            let mp = tmp.join(rest);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&mp)
                .map_err(io_ctx("creating", &mp))?;
        }

        // The skeleton, read-only; then, on top, what is this build's: its /build and /tmp
        // before its store dir, which may lie under /tmp.
        let mut binds = vec![Bind {
            src: cstring(&skel)?,
            dst: cstring(&skel)?,
            recursive: false,
            readonly: true,
            keep_flags: mount_flags_of(&skel),
            desc: "/".to_string(),
        }];
        for (src, at) in [(spec.build_dir, SANDBOX_BUILD_DIR), (tmp.as_path(), "/tmp")] {
            binds.push(Bind {
                src: cstring(src)?,
                dst: cstring(&inside(at))?,
                recursive: false,
                readonly: false,
                keep_flags: 0,
                desc: at.to_string(),
            });
        }
        let store_mp = inside(spec.store_dir);
        binds.push(Bind {
            src: cstring(&store_in_chroot)?,
            dst: cstring(&store_mp)?,
            recursive: false,
            readonly: false,
            keep_flags: 0,
            desc: spec.store_dir.to_string(),
        });
        for (name, phys) in &spec.inputs {
            if mountpoint_like(phys, &store_in_chroot.join(name))? {
                binds.push(Bind {
                    src: cstring(phys)?,
                    dst: cstring(&store_mp.join(name))?,
                    recursive: false,
                    readonly: true,
                    keep_flags: mount_flags_of(phys),
                    desc: format!("{}/{name}", spec.store_dir),
                });
            }
        }
        for (in_path, host, readonly, _) in system {
            binds.push(Bind {
                src: cstring(&host)?,
                dst: cstring(&inside(&in_path))?,
                recursive: true,
                readonly,
                keep_flags: mount_flags_of(&host),
                desc: in_path,
            });
        }

        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ok(Sandbox {
            chroot_c: cstring(&skel)?,
            build_dir_c: CString::new(SANDBOX_BUILD_DIR)
                .map_err(|_| io::Error::other("NUL in the sandbox build dir"))?,
            chroot,
            store_in_chroot,
            binds,
            uid_map: format!("{SANDBOX_UID} {uid} 1").into_bytes(),
            gid_map: format!("{SANDBOX_GID} {gid} 1").into_bytes(),
            private_network: spec.private_network,
        })
    }

    /// `<chroot><store dir>`: where the builder's writes to the store land.
    pub fn store_in_chroot(&self) -> &Path {
        &self.store_in_chroot
    }

    /// The build's own directory (its store dir and `/tmp`; the skeleton is shared).
    pub fn chroot_dir(&self) -> &Path {
        self.chroot.path()
    }

    /// Describes the step a child reported (see [`Sandbox::child_setup`]).
    pub fn describe_step(&self, step: u8, index: u32) -> String {
        let bind = |i: u32| {
            self.binds
                .get(i as usize)
                .map(|b| b.desc.clone())
                .unwrap_or_else(|| format!("#{i}"))
        };
        match step {
            STEP_UNSHARE => "creating namespaces (unshare)".into(),
            STEP_SETGROUPS => "writing /proc/self/setgroups".into(),
            STEP_UID_MAP => "writing /proc/self/uid_map".into(),
            STEP_GID_MAP => "writing /proc/self/gid_map".into(),
            STEP_PRIVATE => "making / a private mount".into(),
            STEP_BIND => format!("bind-mounting {}", bind(index)),
            STEP_REMOUNT => format!("remounting {} read-only", bind(index)),
            STEP_HOSTNAME => "setting the hostname".into(),
            STEP_CHROOT => "chroot".into(),
            STEP_CHDIR => format!("chdir to {SANDBOX_BUILD_DIR}"),
            _ => format!("step {step}"),
        }
    }

    /// The child side, run between clone and exec (`super::spawn`). Only system calls: no
    /// allocation, no locks.
    /// On failure, writes `[step, index (4 bytes LE)]` to `err_fd` and returns the OS error.
    pub fn child_setup(&self, err_fd: i32) -> io::Result<()> {
        let fail = |step: u8, index: u32| -> io::Error {
            let e = io::Error::last_os_error();
            let i = index.to_le_bytes();
            let msg = [step, i[0], i[1], i[2], i[3]];
            // SAFETY: writing 5 bytes from a stack buffer to a pipe we own.
            unsafe { libc::write(err_fd, msg.as_ptr().cast(), msg.len()) };
            e
        };
        let mut flags =
            libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if self.private_network {
            flags |= libc::CLONE_NEWNET;
        }
        // SAFETY (all calls below): plain system calls on NUL-terminated strings and buffers that
        // live in `self`, which outlives the call.
        if unsafe { libc::unshare(flags) } != 0 {
            return Err(fail(STEP_UNSHARE, 0));
        }
        if !write_proc(c"/proc/self/setgroups", b"deny") {
            return Err(fail(STEP_SETGROUPS, 0));
        }
        if !write_proc(c"/proc/self/uid_map", &self.uid_map) {
            return Err(fail(STEP_UID_MAP, 0));
        }
        if !write_proc(c"/proc/self/gid_map", &self.gid_map) {
            return Err(fail(STEP_GID_MAP, 0));
        }
        let none = c"none";
        if unsafe {
            libc::mount(
                none.as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(fail(STEP_PRIVATE, 0));
        }
        for (i, b) in self.binds.iter().enumerate() {
            let mut f = libc::MS_BIND;
            if b.recursive {
                f |= libc::MS_REC;
            }
            if unsafe {
                libc::mount(
                    b.src.as_ptr(),
                    b.dst.as_ptr(),
                    std::ptr::null(),
                    f,
                    std::ptr::null(),
                )
            } != 0
            {
                return Err(fail(STEP_BIND, i as u32));
            }
            if b.readonly
                && unsafe {
                    libc::mount(
                        std::ptr::null(),
                        b.dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | b.keep_flags,
                        std::ptr::null(),
                    )
                } != 0
            {
                return Err(fail(STEP_REMOUNT, i as u32));
            }
        }
        let host = b"localhost";
        if unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) } != 0 {
            return Err(fail(STEP_HOSTNAME, 0));
        }
        if unsafe { libc::chroot(self.chroot_c.as_ptr()) } != 0 {
            return Err(fail(STEP_CHROOT, 0));
        }
        if unsafe { libc::chdir(self.build_dir_c.as_ptr()) } != 0 {
            return Err(fail(STEP_CHDIR, 0));
        }
        Ok(())
    }
}

const STEP_UNSHARE: u8 = 1;
const STEP_SETGROUPS: u8 = 2;
const STEP_UID_MAP: u8 = 3;
const STEP_GID_MAP: u8 = 4;
const STEP_PRIVATE: u8 = 5;
const STEP_BIND: u8 = 6;
const STEP_REMOUNT: u8 = 7;
const STEP_HOSTNAME: u8 = 8;
const STEP_CHROOT: u8 = 9;
const STEP_CHDIR: u8 = 10;

/// Writes `data` to a /proc file (child side: no allocation).
fn write_proc(path: &std::ffi::CStr, data: &[u8]) -> bool {
    // SAFETY: open/write/close on a NUL-terminated path and a live buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        libc::close(fd);
        n == data.len() as isize
    }
}

/// A close-on-exec pipe: (read end, write end).
pub fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads the step a failed child reported on the error pipe (non-blocking; the write ends must be
/// closed). `None` if it reported nothing.
pub fn read_failed_step(r: &OwnedFd) -> Option<(u8, u32)> {
    let mut buf = [0u8; 5];
    // SAFETY: reading into a stack buffer from a descriptor we own.
    let n = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    (n == 5).then(|| (buf[0], u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]])))
}
