//! CPU and memory of processes, from /proc.

use std::time::Instant;

/// Clock ticks per second for /proc/<pid>/stat's utime and stime (USER_HZ,
/// 100 on every Linux this runs on).
const TICKS_PER_SEC: f64 = 100.0;

/// utime + stime of `pid` in seconds ("self" for this process).
pub fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces; the fields after its ')' are fixed.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime field 15.
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / TICKS_PER_SEC
}

/// A field of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resets `pid`'s peak RSS (VmHWM) to its current RSS (`clear_refs` 5).
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The children of `pid` (nginx and HAProxy workers).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// A group of processes measured together (one proxy, or both sidecars).
#[derive(Debug, Clone)]
pub struct Group {
    pub pids: Vec<u32>,
}

impl Group {
    pub fn cpu(&self) -> f64 {
        self.pids.iter().map(|p| cpu_seconds(&p.to_string())).sum()
    }
    pub fn rss_mib(&self) -> f64 {
        self.sum("VmRSS")
    }
    pub fn peak_mib(&self) -> f64 {
        self.sum("VmHWM")
    }
    fn sum(&self, field: &str) -> f64 {
        self.pids.iter().map(|&p| status_kib(p, field)).sum::<u64>() as f64 / 1024.0
    }
    pub fn reset_peak(&self) {
        self.pids.iter().for_each(|&p| reset_peak(p));
    }
}

/// Time the hypervisor gave this VM's CPUs to someone else, summed over CPUs,
/// in seconds (the `steal` column of /proc/stat).
pub fn steal_seconds() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            line.split_whitespace().nth(8)?.parse::<f64>().ok()
        })
        .map_or(0.0, |t| t / TICKS_PER_SEC)
}

/// Steal time over a stretch of wall time, as a percentage of the machine.
pub struct StealMeter {
    steal: f64,
    at: Instant,
}

impl StealMeter {
    pub fn start() -> StealMeter {
        StealMeter {
            steal: steal_seconds(),
            at: Instant::now(),
        }
    }

    pub fn percent(&self, cores: usize) -> f64 {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9) * cores.max(1) as f64;
        100.0 * (steal_seconds() - self.steal) / wall
    }
}

/// CPU used between `start` and `stop`, in seconds and as a share of one core.
pub struct CpuMeter {
    pid: String,
    cpu: f64,
    at: Instant,
}

impl CpuMeter {
    pub fn start_self() -> CpuMeter {
        CpuMeter {
            pid: "self".into(),
            cpu: cpu_seconds("self"),
            at: Instant::now(),
        }
    }

    /// Percent of one core since the start.
    pub fn percent(&self) -> f64 {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        100.0 * (cpu_seconds(&self.pid) - self.cpu) / wall
    }
}
