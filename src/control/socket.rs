//! The daemon's control socket: `RUN_DIR/NAME.sock` (mode 0600 in a 0700 directory), one JSON
//! request line and one JSON reply line per connection. `vduse-blkd resize` is its client.
//!
//! Owns: the socket file's life (bound before the `ready` line, removed at exit; a stale file
//! from a crashed daemon is replaced, a live one refused), the wire format, and the client
//! call. Must not touch: what a request does (the daemon answers it, see
//! [`super::daemon`]).

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where sockets live unless `--run-dir` says otherwise.
pub const RUN_DIR: &str = "/run/vduse-blkd";
/// How long the client waits for the daemon's reply.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon gives one connection, from accept to reply sent: the main thread
/// answers it, and must get back to signals and device events.
const SERVE_DEADLINE: Duration = Duration::from_millis(1000);
/// Connections answered per wake-up; more wait for the next turn of the main loop.
const PER_WAKEUP: usize = 8;
/// Longest request line accepted.
const MAX_LINE: u64 = 4096;

/// A request to a running daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Change the capacity to `bytes` (shrinking only with `force`).
    Resize {
        /// New capacity in bytes.
        bytes: u64,
        /// Allow shrinking.
        force: bool,
    },
    /// The live counters and stage latencies, per queue and in total, since the start or
    /// the last reset; with `reset`, start counting again afterwards.
    Stats {
        /// Start a new counting period after this answer.
        reset: bool,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The capacity in bytes after the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// The answer to [`Request::Stats`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
}

impl Reply {
    /// A refusal.
    pub fn refused(error: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: Some(error.into()),
            capacity: None,
            stats: None,
        }
    }
}

/// Why the socket cannot be used.
#[derive(Debug, Error)]
pub enum SocketError {
    /// Another process answers on the socket of this name.
    #[error("{0} is in use by a running daemon")]
    InUse(PathBuf),
    /// No daemon listens there.
    #[error("no daemon serves this name ({0} is missing or nobody listens on it)")]
    NoDaemon(PathBuf),
    /// Creating, binding, connecting, reading or writing failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The other side sent something that is not a line of the protocol.
    #[error("bad message on {path}: {why}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
}

/// The socket path of device `name` under `dir`.
pub fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// A bound control socket; the file is removed when this is dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Bind `dir/NAME.sock`, creating `dir` (0700) if needed.
    pub fn bind(dir: &Path, name: &str) -> Result<Self, SocketError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| SocketError::Io { what, path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("cannot create", dir))?;
        let path = path_of(dir, name);
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(SocketError::InUse(path));
            }
            // Left by a daemon that died: nobody answers on it.
            fs::remove_file(&path).map_err(io("cannot remove the stale socket", &path))?;
        }
        let listener = UnixListener::bind(&path).map_err(io("cannot bind", &path))?;
        let sock = ControlSocket { listener, path };
        fs::set_permissions(&sock.path, fs::Permissions::from_mode(0o600))
            .map_err(io("cannot set the mode of", &sock.path))?;
        sock.listener
            .set_nonblocking(true)
            .map_err(io("cannot make non-blocking", &sock.path))?;
        Ok(sock)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serve every connection waiting now: read its request, answer with `handle`'s reply.
    /// A client that misbehaves gets an error reply (or nothing) and is dropped; it never
    /// stops the daemon.
    pub fn serve_pending(&self, handle: &mut dyn FnMut(Request) -> Reply) {
        for _ in 0..PER_WAKEUP {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    return;
                }
            };
            if let Err(e) = answer(stream, handle) {
                log::warn!("control socket: {e}");
            }
        }
    }
}

impl AsFd for ControlSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Read one request line within `SERVE_DEADLINE` of now (a client that trickles bytes
/// gets no more time than one that sends at once).
fn read_request_line(mut stream: &UnixStream) -> io::Result<String> {
    let end = Instant::now() + SERVE_DEADLINE;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || buf.len() as u64 > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request line in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match io::Read::read(&mut stream, &mut chunk)? {
            0 => break,
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    String::from_utf8(line.to_vec()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn answer(stream: UnixStream, handle: &mut dyn FnMut(Request) -> Reply) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(SERVE_DEADLINE))?;
    let line = read_request_line(&stream)?;
    let reply = match serde_json::from_str::<Request>(line.trim_end()) {
        Ok(req) => handle(req),
        Err(e) => Reply::refused(format!("not a request: {e}")),
    };
    send(&stream, &reply)
}

fn send(mut w: impl Write, v: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Send `req` to the daemon serving `name` under `dir` and return its reply.
pub fn call(dir: &Path, name: &str, req: &Request) -> Result<Reply, SocketError> {
    let path = path_of(dir, name);
    let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            SocketError::NoDaemon(path.clone())
        }
        _ => SocketError::Io {
            what: "cannot connect to",
            path: path.clone(),
            source: e,
        },
    })?;
    let io = |what| {
        let path = path.clone();
        move |source| SocketError::Io { what, path, source }
    };
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(io("cannot set timeouts on"))?;
    send(&stream, req).map_err(io("cannot write to"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(io("cannot read from"))?;
    serde_json::from_str(line.trim_end()).map_err(|e| SocketError::Protocol {
        path,
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_request_is_answered_and_the_file_goes_with_the_socket() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("run");
        let sock = ControlSocket::bind(&dir, "d0").unwrap();
        assert_eq!(fs::metadata(sock.path()).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let server = std::thread::scope(|s| {
            let client = s.spawn(|| {
                call(
                    &dir,
                    "d0",
                    &Request::Resize {
                        bytes: 1 << 30,
                        force: false,
                    },
                )
            });
            let mut seen = Vec::new();
            // Poll the non-blocking listener until the client's request was handled.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while seen.is_empty() && std::time::Instant::now() < deadline {
                sock.serve_pending(&mut |r| {
                    seen.push(r);
                    Reply {
                        ok: true,
                        error: None,
                        capacity: Some(1 << 30),
                        stats: None,
                    }
                });
                std::thread::yield_now();
            }
            (seen, client.join().unwrap())
        });
        let (seen, reply) = server;
        assert_eq!(
            seen,
            [Request::Resize {
                bytes: 1 << 30,
                force: false
            }]
        );
        assert_eq!(reply.unwrap().capacity, Some(1 << 30));
        let path = sock.path().to_path_buf();
        drop(sock);
        assert!(!path.exists(), "the socket file is removed at exit");
        assert!(matches!(
            call(
                &dir,
                "d0",
                &Request::Resize {
                    bytes: 0,
                    force: false
                }
            ),
            Err(SocketError::NoDaemon(_))
        ));
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let d = tempfile::tempdir().unwrap();
        let first = ControlSocket::bind(d.path(), "d1").unwrap();
        assert!(matches!(
            ControlSocket::bind(d.path(), "d1"),
            Err(SocketError::InUse(_))
        ));
        drop(first);
        // What a crashed daemon leaves: the file, with nobody listening on it.
        let path = path_of(d.path(), "d1");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let again = ControlSocket::bind(d.path(), "d1").unwrap();
        assert_eq!(again.path(), path);
    }

    #[test]
    fn a_silent_client_holds_the_daemon_for_one_deadline_only() {
        let d = tempfile::tempdir().unwrap();
        let sock = ControlSocket::bind(d.path(), "d3").unwrap();
        let silent = UnixStream::connect(sock.path()).unwrap();
        let t = Instant::now();
        sock.serve_pending(&mut |_| unreachable!("nothing was sent"));
        let took = t.elapsed();
        assert!(
            took >= SERVE_DEADLINE && took < SERVE_DEADLINE * 3,
            "the main thread was held {took:?}"
        );
        drop(silent);
    }

    #[test]
    fn garbage_gets_an_error_reply() {
        let d = tempfile::tempdir().unwrap();
        let sock = ControlSocket::bind(d.path(), "d2").unwrap();
        let path = sock.path().to_path_buf();
        let reply = std::thread::scope(|s| {
            let client = s.spawn(move || {
                let mut st = UnixStream::connect(&path).unwrap();
                st.write_all(b"{\"cmd\":\"launch\"}\n").unwrap();
                let mut line = String::new();
                BufReader::new(&st).read_line(&mut line).unwrap();
                line
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !client.is_finished() && std::time::Instant::now() < deadline {
                sock.serve_pending(&mut |_| unreachable!("not a valid request"));
                std::thread::yield_now();
            }
            client.join().unwrap()
        });
        let r: Reply = serde_json::from_str(reply.trim_end()).unwrap();
        assert!(!r.ok && r.error.unwrap().contains("not a request"));
    }
}
