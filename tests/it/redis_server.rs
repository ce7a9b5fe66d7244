//! A private `redis-server` per test, on a free port (never the shared 6379).
//! Missing binary: the test is skipped with a printed reason, except under
//! `CI=true`, where it fails.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    appendonly: bool,
    /// `DEBUG` allowed (`DEBUG POPULATE` fills it with keys).
    debug: bool,
}

pub fn available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "redis-server is not installed, and CI=true requires it"
        );
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server); the redis half of this test did not run");
    }
    found
}

impl RedisServer {
    /// Starts redis-server with AOF persistence (`appendfsync always` when `appendonly`).
    pub fn start(appendonly: bool) -> Option<Self> {
        Self::start_with(appendonly, false)
    }

    /// [`RedisServer::start`], with the `DEBUG` command allowed.
    pub fn start_with(appendonly: bool, debug: bool) -> Option<Self> {
        if !available() {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut s = Self {
            child: None,
            port,
            dir: tempfile::tempdir().ok()?,
            appendonly,
            debug,
        };
        s.spawn();
        Some(s)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--maxmemory-policy", "noeviction"])
        .args(if self.debug {
            &["--enable-debug-command", "yes"][..]
        } else {
            &[]
        })
        .arg("--dir")
        .arg(self.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if self.appendonly {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        self.child = Some(cmd.spawn().expect("start redis-server"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// Sends one inline command (e.g. `CONFIG SET maxmemory-policy allkeys-lru`);
    /// true on a `+OK`.
    pub fn command(&self, line: &str) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(2000)));
        let mut buf = [0u8; 64];
        s.write_all(format!("{line}\r\n").as_bytes()).is_ok()
            && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+OK"))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection of the test's own (to look at or break the queue's keys).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("conn")
    }

    /// Kills the server (SIGKILL); data survives only through the AOF.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server without closing its connections (SIGSTOP), or lets
    /// it go on (`false`, SIGCONT): a Redis that hangs.
    pub fn hang(&self, hung: bool) {
        if let Some(c) = &self.child {
            let signal = if hung { "-STOP" } else { "-CONT" };
            let status = Command::new("kill")
                .arg(signal)
                .arg(c.id().to_string())
                .status()
                .expect("kill");
            assert!(status.success(), "kill {signal}");
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Puts a string where `key` (a stream, a list) was, kept aside under
/// `<key>.kept`, as another program on the same names would;
/// [`mend_key`] puts it back.
pub async fn break_key(conn: &mut redis::aio::MultiplexedConnection, key: &str) {
    let _: () = redis::pipe()
        .atomic()
        .cmd("RENAME")
        .arg(key)
        .arg(format!("{key}.kept"))
        .ignore()
        .cmd("SET")
        .arg(key)
        .arg("another program's")
        .ignore()
        .query_async(conn)
        .await
        .expect("break");
}

/// `key` as it was before [`break_key`].
pub async fn mend_key(conn: &mut redis::aio::MultiplexedConnection, key: &str) {
    let _: () = redis::cmd("RENAME")
        .arg(format!("{key}.kept"))
        .arg(key)
        .query_async(conn)
        .await
        .expect("mend");
}
