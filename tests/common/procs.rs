//! Looking at the machine's processes, for checks such as "the killed runner's builder is gone".
//! A check that cannot look fails the test: it never passes for want of a tool.

/// Whether a live process (other than this one) has a command line containing `pattern` (its
/// arguments joined by spaces, as `pgrep -f` matches). Reads `/proc`; panics when it cannot.
pub fn running(pattern: &str) -> bool {
    let me = std::process::id();
    let dir = std::fs::read_dir("/proc")
        .unwrap_or_else(|e| panic!("cannot list /proc to look for `{pattern}`: {e}"));
    let mut looked = 0usize;
    for entry in dir {
        let entry = entry.unwrap_or_else(|e| panic!("cannot read /proc: {e}"));
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        looked += 1;
        if pid == me {
            continue;
        }
        // A process may exit while we look: its entry is gone, which is not an error.
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        // Zombies (exited, not reaped) have an empty command line: not running.
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(pattern) {
            return true;
        }
    }
    // At least this process is listed: an empty /proc means it is not procfs.
    assert!(looked > 0, "/proc lists no process: is procfs mounted?");
    false
}
