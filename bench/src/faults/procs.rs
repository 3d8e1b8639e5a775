//! The processes a fault run starts (redis-server, taskstream nodes) and the signals it sends
//! them. Every child is registered, so `kill_all` (run at the end, on error, on panic and on
//! SIGINT/SIGTERM) leaves none behind; each also gets `PR_SET_PDEATHSIG`, so even a SIGKILL of the
//! tool takes its children with it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Pids of every child still running.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn registry() -> std::sync::MutexGuard<'static, Vec<u32>> {
    // Only pushes and removals happen under this lock; a poisoned one still holds valid pids.
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

/// SIGKILL to every registered child (a stopped one too: SIGKILL needs no SIGCONT).
pub fn kill_all() {
    for pid in registry().drain(..) {
        signal(pid, libc::SIGKILL);
    }
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this tool started and has not yet reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn spawn(command: &mut Command) -> Result<Child> {
    // SAFETY: prctl is async-signal-safe; it only sets an attribute of the new process.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = command.spawn()?;
    registry().push(child.id());
    Ok(child)
}

fn reap(mut child: Child) {
    registry().retain(|&pid| pid != child.id());
    let _ = child.kill();
    let _ = child.wait();
}

/// A port free right now on 127.0.0.1 (redis-server needs one given; it may be taken before
/// redis binds it, then the start is retried).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    binary: PathBuf,
}

impl Redis {
    /// An AOF with `appendfsync always`: every acknowledged write is on disk before the `202`,
    /// so a SIGKILL of Redis loses nothing acknowledged.
    pub async fn start(binary: &Path, dir: &Path) -> Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let mut redis = Redis {
            child: None,
            port: 0,
            dir: dir.to_path_buf(),
            binary: binary.to_path_buf(),
        };
        for _ in 0..5 {
            redis.port = free_port()?;
            if redis.launch().await? {
                return Ok(redis);
            }
        }
        bail!("redis-server did not start; see {}", dir.display())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    async fn launch(&mut self) -> Result<bool> {
        let mut child = spawn(
            Command::new(&self.binary)
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--dir", self.dir.to_str().context("a UTF-8 directory")?])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .args(["--logfile", "redis.log"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .with_context(|| format!("start {}", self.binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                reap(child);
                return Ok(false);
            }
            if ping(self.port).await {
                self.child = Some(child);
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reap(child);
        bail!(
            "redis-server on port {} did not answer PING in 20 s",
            self.port
        )
    }

    /// SIGKILL (nothing saved but what the AOF already has) or SIGTERM (a clean shutdown), and
    /// waits for the exit.
    pub async fn stop(&mut self, sig: libc::c_int) {
        if let Some(child) = self.child.take() {
            signal(child.id(), sig);
            wait_exit(child, Duration::from_secs(10)).await;
        }
    }

    /// On the same port and directory, so the AOF is loaded.
    pub async fn restart(&mut self) -> Result<()> {
        if !self.launch().await? {
            bail!("redis-server did not restart on port {}", self.port);
        }
        Ok(())
    }
}

async fn ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let mut answer = [0u8; 7];
    socket.write_all(b"PING\r\n").await.is_ok()
        && socket.read_exact(&mut answer).await.is_ok()
        && &answer == b"+PONG\r\n"
}

/// Waits for a signalled child to exit, SIGKILL after `grace`; never blocks the runtime.
async fn wait_exit(mut child: Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    registry().retain(|&pid| pid != child.id());
}

/// One taskstream node; each restart is a new process (and port), logging to its own file.
pub struct Node {
    child: Option<Child>,
    pub addr: Option<SocketAddr>,
    pub stopped: bool,
    binary: PathBuf,
    args: Vec<String>,
    logs: PathBuf,
    name: String,
    pub starts: u32,
}

impl Node {
    pub async fn start(
        binary: &Path,
        args: Vec<String>,
        logs: &Path,
        name: String,
    ) -> Result<Node> {
        let mut node = Node {
            child: None,
            addr: None,
            stopped: false,
            binary: binary.to_path_buf(),
            args,
            logs: logs.to_path_buf(),
            name,
            starts: 0,
        };
        node.launch().await?;
        Ok(node)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process and waits for the line that names its port. It prints that line
    /// before it waits (up to 3 s) for Redis, so a node started while Redis is down is found too.
    async fn launch(&mut self) -> Result<()> {
        self.starts += 1;
        let log = self.logs.join(format!("{}.{}.log", self.name, self.starts));
        let mut child = spawn(
            Command::new(&self.binary)
                .args(["--bind", "127.0.0.1:0"])
                .args(&self.args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log)?),
        )
        .with_context(|| format!("start {}", self.binary.display()))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = match tokio::time::timeout(Duration::from_secs(20), line).await {
            Ok(Ok(Ok(line))) => line,
            _ => {
                reap(child);
                bail!(
                    "{} printed no address in 20 s; see {}",
                    self.name,
                    log.display()
                );
            }
        };
        let addr = line
            .trim()
            .strip_prefix("taskstream listening on http://")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("{}: unexpected first line {line:?}", self.name))?;
        self.child = Some(child);
        self.addr = Some(addr);
        self.stopped = false;
        Ok(())
    }

    pub async fn kill(&mut self) {
        self.addr = None;
        self.stopped = false;
        if let Some(child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            wait_exit(child, Duration::from_secs(5)).await;
        }
    }

    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.launch().await
    }

    pub fn stop(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGSTOP);
            self.stopped = true;
        }
    }

    pub fn cont(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGCONT);
        }
        self.stopped = false;
    }

    /// Whether the process died by itself (a crash is a finding, not a fault).
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }
}
