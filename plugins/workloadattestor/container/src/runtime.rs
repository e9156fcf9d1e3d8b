//! The Docker Engine API query `GET /containers/<id>/json` over a Unix socket, written by
//! hand over a blocking [`UnixStream`] so the whole exchange fits one deadline
//! (SECURITY.md §3.4 item 42) and one size cap.
//!
//! Why not an HTTP client crate: the agent needs one GET on a local socket, with a hard
//! deadline on connect, write and every read, and a response cap; hyper + hyper-util's
//! Unix connector would add an async client stack to a blocking attestor for that. The
//! HTTP/1.1 subset handled: a status line, headers, and a body framed by
//! `Content-Length`, `Transfer-Encoding: chunked`, or the end of the connection.

use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike as _};

/// Largest response accepted (status line, headers and body), in bytes.
pub(crate) const MAX_RESPONSE: usize = 1 << 20;

/// What the runtime says about a container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Inspect {
    /// `Config.Image`: the image reference the container was created from.
    pub(crate) image: Option<String>,
    /// `Name` without its leading `/`.
    pub(crate) name: Option<String>,
}

#[derive(serde::Deserialize)]
struct InspectJson {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name", default)]
    name: Option<String>,
    #[serde(rename = "Config", default)]
    config: Option<ConfigJson>,
}

#[derive(serde::Deserialize)]
struct ConfigJson {
    #[serde(rename = "Image", default)]
    image: Option<String>,
}

/// Asks the runtime at `socket` about container `id` (64 hex digits), all within
/// `timeout`. Errors describe the failure without the id.
pub(crate) fn inspect(socket: &Path, id: &str, timeout: Duration) -> Result<Inspect, String> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect_unix(socket, deadline)?;
    let request = format!(
        "GET /containers/{id}/json HTTP/1.1\r\nHost: localhost\r\nUser-Agent: tessera-agent\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream
        .set_write_timeout(Some(remaining(deadline)?))
        .map_err(|e| format!("set the write timeout: {e}"))?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| io_error("send the request", &e))?;
    let (status, body) = read_response(&mut stream, deadline)?;
    match status {
        200 => {}
        404 => return Err("the runtime does not know the container (HTTP 404)".to_owned()),
        other => return Err(format!("the runtime answered HTTP {other}")),
    }
    let json: InspectJson =
        serde_json::from_slice(&body).map_err(|e| format!("malformed JSON response: {e}"))?;
    if json.id != id {
        return Err("the runtime answered for another container".to_owned());
    }
    Ok(Inspect {
        image: json.config.and_then(|c| c.image).filter(|i| !i.is_empty()),
        name: json
            .name
            .map(|n| n.strip_prefix('/').unwrap_or(&n).to_owned())
            .filter(|n| !n.is_empty()),
    })
}

/// Time left before `deadline`, or the timeout error.
fn remaining(deadline: Instant) -> Result<Duration, String> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| "timed out".to_owned())
}

fn io_error(what: &str, err: &std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timed out".to_owned(),
        _ => format!("{what}: {err}"),
    }
}

/// Connects with `SO_SNDTIMEO` set first: a stream connect to a listener whose backlog
/// is full blocks until that timeout (`UnixStream::connect` would block indefinitely).
fn connect_unix(path: &Path, deadline: Instant) -> Result<UnixStream, String> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("create a socket: {e}"))?;
    let left = remaining(deadline)?;
    let micros = i64::try_from(left.as_micros()).unwrap_or(i64::MAX).max(1);
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::microseconds(micros))
        .map_err(|e| format!("set the connect timeout: {e}"))?;
    let addr = UnixAddr::new(path).map_err(|e| format!("socket path: {e}"))?;
    connect(fd.as_raw_fd(), &addr).map_err(|e| match e {
        nix::errno::Errno::EAGAIN | nix::errno::Errno::EINPROGRESS => {
            "timed out while connecting".to_owned()
        }
        e => format!("connect to {}: {e}", path.display()),
    })?;
    Ok(UnixStream::from(fd))
}

/// Reads until the response is complete, the peer closes, the deadline passes, or more
/// than [`MAX_RESPONSE`] bytes arrive.
fn read_response(stream: &mut UnixStream, deadline: Instant) -> Result<(u16, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        stream
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(|e| format!("set the read timeout: {e}"))?;
        let eof = match stream.read(&mut chunk) {
            Ok(0) => true,
            Ok(n) => {
                if buf.len() + n > MAX_RESPONSE {
                    return Err(format!("response larger than {MAX_RESPONSE} bytes"));
                }
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error("read the response", &e)),
        };
        match parse_response(&buf, eof)? {
            Some(done) => return Ok(done),
            None if eof => return Err("connection closed before the response ended".to_owned()),
            None => {}
        }
    }
}

/// Parses a complete response from `buf`: `Ok(None)` when more bytes are needed.
/// `eof` says the peer closed (ending a body without framing).
pub(crate) fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(buf.get(..head_end).unwrap_or_default())
        .map_err(|_| "malformed HTTP headers".to_owned())?;
    let body = buf.get(head_end + 4..).unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = parse_status_line(status_line)?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| "malformed HTTP header".to_owned())?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| "malformed Content-Length".to_owned())?;
            if content_length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length headers".to_owned());
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err("unsupported Transfer-Encoding".to_owned());
            }
            chunked = true;
        }
    }
    if chunked {
        return Ok(dechunk(body)?.map(|b| (status, b)));
    }
    match content_length {
        Some(n) if body.len() >= n => {
            Ok(Some((status, body.get(..n).unwrap_or_default().to_vec())))
        }
        Some(_) => Ok(None),
        None if eof => Ok(Some((status, body.to_vec()))),
        None => Ok(None),
    }
}

/// `HTTP/1.x <3 digits> <reason>` -> the status code (1xx is refused: nothing here asks
/// for an interim response).
fn parse_status_line(line: &str) -> Result<u16, String> {
    let malformed = || "malformed HTTP status line".to_owned();
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))
        .ok_or_else(malformed)?;
    let code = rest.get(..3).ok_or_else(malformed)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) || rest.get(3..4).is_some_and(|s| s != " ") {
        return Err(malformed());
    }
    let code: u16 = code.parse().map_err(|_| malformed())?;
    if !(200..=599).contains(&code) {
        return Err(malformed());
    }
    Ok(code)
}

/// Decodes a chunked body: `Ok(None)` until the last chunk and the trailer end arrived.
fn dechunk(mut data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let malformed = || "malformed chunked body".to_owned();
    let mut out = Vec::new();
    loop {
        let Some(line_end) = find(data, b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(data.get(..line_end).unwrap_or_default())
            .map_err(|_| malformed())?;
        let size = line.split(';').next().unwrap_or_default().trim();
        if size.is_empty() || size.len() > 8 {
            return Err(malformed());
        }
        let size = usize::from_str_radix(size, 16).map_err(|_| malformed())?;
        data = data.get(line_end + 2..).unwrap_or_default();
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(end) = find(data, b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(out));
                }
                data = data.get(end + 2..).unwrap_or_default();
            }
        }
        let Some(chunk) = data.get(..size) else {
            return Ok(None);
        };
        match data.get(size..size + 2) {
            None | Some([b'\r']) => return Ok(None),
            Some(b"\r\n") => {}
            Some(_) => return Err(malformed()),
        }
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked_bodies() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(
            parse_response(r, false).unwrap(),
            Some((200, b"{}".to_vec()))
        );
        assert_eq!(parse_response(&r[..r.len() - 1], false).unwrap(), None);
        let r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(r, false).unwrap(),
            Some((200, b"abcde".to_vec()))
        );
        for cut in 1..r.len() {
            let head_len = r.len() - cut;
            assert_eq!(
                parse_response(&r[..head_len], false).unwrap(),
                None,
                "{cut}"
            );
        }
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(parse_response(r, false).unwrap(), Some((200, Vec::new())));
        // No framing: the body ends with the connection.
        let r = b"HTTP/1.0 404 Not Found\r\n\r\nno";
        assert_eq!(parse_response(r, false).unwrap(), None);
        assert_eq!(
            parse_response(r, true).unwrap(),
            Some((404, b"no".to_vec()))
        );
    }

    #[test]
    fn rejects_malformed_responses() {
        for r in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n123456789\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
            b"\xff\r\n\r\n",
        ] {
            assert!(
                parse_response(r, true).is_err(),
                "{}",
                String::from_utf8_lossy(r)
            );
        }
    }
}
