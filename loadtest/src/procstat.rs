//! What `/proc` says about a process and the machine: CPU time, resident memory, open files,
//! children; and the one process-wide knob the harness turns itself (the open-file limit).
//!
//! CPU time is `utime + stime` of `/proc/PID/stat` (all threads of the process), converted from
//! clock ticks with `sysconf(_SC_CLK_TCK)` (100 on every Linux we know of). Resident memory is
//! `VmRSS` of `/proc/PID/status`. A [`ProcessGroup`] sums a process and its descendants, which is
//! what an nginx master and its workers, or a harness and its worker processes, need.

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use serde::Serialize;

/// Clock ticks per second for `/proc/PID/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// CPU time (user + system, all threads) a process has used so far; `None` if it is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = stat_fields(&stat)?;
    // Fields after the command: state is index 0, so utime (14th overall) is index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = utime + stime;
    let hz = clock_ticks_per_second();
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// The parent pid of a process, from `/proc/PID/stat`.
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat)?.get(1)?.parse().ok()
}

/// The space-separated fields of `/proc/PID/stat` after `(comm)`, which may itself hold spaces.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().collect())
}

/// Resident set size of a process in KiB (`VmRSS`); `None` if it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Open file descriptors of a process (entries of `/proc/PID/fd`); `None` if unreadable.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Every live descendant of `root` (children, grandchildren, ...), found by scanning `/proc`.
pub fn descendants(root: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent_pid(pid)?)))
        .collect();
    let mut found = BTreeSet::from([root]);
    loop {
        let before = found.len();
        for (pid, parent) in &parents {
            if found.contains(parent) {
                found.insert(*pid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found.remove(&root);
    found.into_iter().collect()
}

/// A process and its descendants, measured together (an nginx master and its workers).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessGroup {
    /// The processes whose trees are summed.
    pub roots: Vec<u32>,
}

/// One reading of a [`ProcessGroup`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct GroupSample {
    /// Summed CPU time of every process, in seconds.
    pub cpu_s: f64,
    /// Summed resident memory, in KiB.
    pub rss_kib: u64,
    /// Summed open file descriptors.
    pub fds: u64,
    /// Processes found alive.
    pub processes: usize,
}

impl ProcessGroup {
    /// A group of the given roots and, always, their descendants.
    pub fn new(roots: Vec<u32>) -> ProcessGroup {
        ProcessGroup { roots }
    }

    /// True when the group has no process to measure.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// Every pid of the group right now.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = BTreeSet::new();
        for &root in &self.roots {
            pids.insert(root);
            pids.extend(descendants(root));
        }
        pids.into_iter().collect()
    }

    /// [`sample`](Self::sample), or `None` for an empty group (nothing to measure).
    pub fn sample_if_any(&self) -> Option<GroupSample> {
        (!self.is_empty()).then(|| self.sample())
    }

    /// Summed resident memory of the group, in KiB; `None` for an empty group. Cheaper than
    /// [`sample`](Self::sample), which also counts open files: a relay holding 17,000 sockets
    /// has 17,000 entries in `/proc/PID/fd`, too many to list four times a second.
    pub fn rss_kib(&self) -> Option<u64> {
        (!self.is_empty()).then(|| self.pids().into_iter().filter_map(rss_kib).sum())
    }

    /// Reads CPU, RSS and fds of every process of the group and sums them.
    pub fn sample(&self) -> GroupSample {
        let mut sample = GroupSample::default();
        for pid in self.pids() {
            if let Some(cpu) = cpu_time(pid) {
                sample.cpu_s += cpu.as_secs_f64();
                sample.rss_kib += rss_kib(pid).unwrap_or(0);
                sample.fds += open_fds(pid).unwrap_or(0);
                sample.processes += 1;
            }
        }
        sample
    }
}

/// CPU time of this process (the load generator itself, all its threads).
pub fn self_cpu_time() -> Duration {
    cpu_time(std::process::id()).unwrap_or_default()
}

/// Machine-wide CPU counters from the first line of `/proc/stat`, in ticks: (busy, total).
pub fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guests are in user.
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// Fraction of all cores busy between two [`machine_cpu_ticks`] readings (0..=1).
pub fn machine_busy_fraction(before: (u64, u64), after: (u64, u64)) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let total = after.1.saturating_sub(before.1) as f64;
    if total > 0.0 { busy / total } else { 0.0 }
}

/// Raises this process's soft open-file limit to its hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to and read from a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// What the report says about the machine a run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    /// Logical CPUs online (`nproc`).
    pub cpus: usize,
    /// CPU model name from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Total memory in MiB.
    pub memory_mib: u64,
    /// This process's open-file limit after raising it.
    pub fd_limit: u64,
    /// Clock ticks per second used to convert `/proc` CPU times.
    pub clock_ticks_per_s: u64,
}

impl MachineInfo {
    /// Reads the machine's description from `/proc`.
    pub fn read() -> MachineInfo {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_mib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|kib| kib.parse::<u64>().ok())
            })
            .unwrap_or(0)
            / 1024;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes to a valid rlimit struct.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        MachineInfo {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            memory_mib,
            fd_limit: limit.rlim_cur,
            clock_ticks_per_s: clock_ticks_per_second(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(open_fds(pid).unwrap() > 0);
        assert!(cpu_time(pid).is_some());
        assert!(parent_pid(pid).is_some());
        let group = ProcessGroup::new(vec![pid]).sample();
        assert!(group.processes >= 1 && group.rss_kib > 0);
    }

    #[test]
    fn parses_stat_with_spaces_in_command() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        let fields = stat_fields(stat).unwrap();
        assert_eq!(fields[0], "S");
        assert_eq!(fields[1], "1");
        assert_eq!(fields[11], "7");
        assert_eq!(fields[12], "3");
    }
}
