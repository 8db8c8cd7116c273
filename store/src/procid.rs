//! Process identities: how a launcher tells, on the same host, that another launcher's process is
//! gone, so its jobs come back at once instead of after the lease expiry.
//!
//! A pid alone is not enough (pids are reused), so a session records its process's identity:
//! the kernel's boot id and the process's start time in clock ticks since boot
//! (`/proc/PID/stat`, field 22). The same pid with another start time, or another boot, is
//! another process.

use std::path::Path;

/// The identity of this process (`BOOTID/STARTTIME`), or '' where /proc does not tell.
pub fn this_process() -> String {
    process(std::process::id() as i64).unwrap_or_default()
}

/// The identity of process `pid` now, or None when no such process exists.
pub fn process(pid: i64) -> Option<String> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let start = start_time(&stat)?;
    Some(format!("{}/{start}", boot_id()))
}

/// Whether the process `pid` recorded with identity `recorded` is certainly gone: no such pid,
/// or a different process under it. An empty identity (not recorded) is never called gone.
pub fn is_gone(pid: i64, recorded: &str) -> bool {
    if recorded.is_empty() {
        return false;
    }
    match process(pid) {
        None => proc_readable(),
        Some(now) => now != recorded,
    }
}

/// /proc is there to ask: without it nothing is known to be gone.
fn proc_readable() -> bool {
    Path::new("/proc/self/stat").exists()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 of `/proc/PID/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted after the last `)`.
fn start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")" come field 3 (state) onwards: field 22 is the 20th of them.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_dead_pid_is_gone() {
        let me = this_process();
        assert!(!me.is_empty());
        assert!(!is_gone(std::process::id() as i64, &me));
        // Same pid, another start time: another process.
        assert!(is_gone(std::process::id() as i64, "x/1"));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i64;
        let id = process(pid);
        child.wait().unwrap();
        if let Some(id) = id {
            assert!(is_gone(pid, &id));
        }
        // Never recorded: never called gone.
        assert!(!is_gone(pid, ""));
    }
}
