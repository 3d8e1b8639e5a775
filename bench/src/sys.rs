//! Linux process helpers: file limit, own CPU time, a server's RSS/CPU from
//! /proc, finding the pids that hold a listening port, spawning the server.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    if soft < hard && rlimit::Resource::NOFILE.set(hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// (user, system) CPU seconds used by this process so far.
pub fn own_cpu() -> (f64, f64) {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return (0.0, 0.0);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// Sets the calling thread's nice value (Linux: PRIO_PROCESS with a thread id applies to
/// that thread alone); None where refused, as below 0 without CAP_SYS_NICE.
pub fn set_thread_nice(nice: i32) -> Option<i32> {
    // SAFETY: plain syscalls on this thread's own id, no memory passed.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    (rc == 0).then_some(nice)
}

/// Resident set size of `pid` in KiB (VmRSS).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Proportional set size of `pid` in KiB (shared pages split between sharers).
pub fn pss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// CPU seconds (user + system) used by `pid` so far.
pub fn pid_cpu(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name.
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some((utime + stime) / tck)
}

/// Number of open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// Sum of a metric over several pids (None if no pid answered).
pub fn sum_over(pids: &[u32], f: impl Fn(u32) -> Option<u64>) -> Option<u64> {
    let v: Vec<u64> = pids.iter().filter_map(|&p| f(p)).collect();
    if v.is_empty() {
        None
    } else {
        Some(v.iter().sum())
    }
}

pub fn sum_cpu(pids: &[u32]) -> Option<f64> {
    let v: Vec<f64> = pids.iter().filter_map(|&p| pid_cpu(p)).collect();
    if v.is_empty() {
        None
    } else {
        Some(v.iter().sum())
    }
}

/// Pids of all processes holding a TCP socket listening on `port` (for nginx
/// this is the master and every worker).
pub fn pids_listening_on(port: u16) -> Vec<u32> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in s.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let Some(p) = f[1].rsplit(':').next() else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() == Some(port) {
                inodes.insert(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    let me = std::process::id();
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if inodes.contains(link.to_string_lossy().as_ref()) {
                    pids.push(pid);
                    break;
                }
            }
        }
    }
    pids.sort_unstable();
    pids
}

/// A server process started by the tool.
pub struct Spawned {
    pub child: Child,
    /// The line the server printed when it was ready.
    pub ready_line: String,
}

impl Spawned {
    /// Start `path args...` and wait until it prints a line containing
    /// "listening" on stdout.
    pub fn start(path: &Path, args: &[String], log: Option<&Path>) -> Result<Self> {
        let mut cmd = Command::new(path);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        match log {
            Some(p) => {
                let f = std::fs::File::create(p)
                    .with_context(|| format!("create server log {}", p.display()))?;
                cmd.stderr(f);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", path.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready_line = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => break line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(st) = child.try_wait()? {
                        bail!("server exited before listening: {st}");
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        bail!("server did not print 'listening' within 30 s");
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = child.wait()?;
                    bail!("server closed stdout before listening: {st}");
                }
            }
        };
        Ok(Spawned { child, ready_line })
    }

    /// The `http://host:port` the server said it listens on.
    pub fn url(&self) -> Option<String> {
        let start = self.ready_line.find("http://")?;
        let url = self.ready_line[start..].split_whitespace().next()?;
        Some(url.trim_end_matches('/').to_string())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait up to `grace`; SIGKILL after that. Returns
    /// (exit code or signal description, seconds it took).
    pub fn stop(mut self, grace: Duration) -> (String, f64) {
        let t = Instant::now();
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return (st.to_string(), t.elapsed().as_secs_f64());
            }
            if t.elapsed() > grace {
                let _ = self.child.kill();
                let st = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                return (
                    format!("killed after {grace:?} ({st})"),
                    t.elapsed().as_secs_f64(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// 1-minute load average.
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// MemTotal in KiB.
pub fn mem_total_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// System-wide CPU seconds from /proc/stat: (busy in user, nice and system
/// mode, i.e. time some process ran; steal).
pub fn machine_cpu() -> Option<(f64, f64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    if f.len() < 8 {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some(((f[0] + f[1] + f[2]) / tck, f[7] / tck))
}
