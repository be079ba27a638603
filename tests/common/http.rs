//! HTTP/1.1 client over a unix socket: requests, their bytes, and the
//! `Response` every test client returns.

use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::{Framing, parse_response};

/// Read/write timeout of the test HTTP client.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// `error.code` of a JSON error body (`{"error": {"code", "message"}}`).
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
    }

    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when the server announced it will close the connection.
    pub fn connection_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    /// True when the connection cannot carry another request after this
    /// response (to a HEAD request when `head`): the server announced
    /// `Connection: close`, or the body ran until it closed.
    pub fn ends_connection(&self, head: bool) -> bool {
        self.connection_close() || matches!(Framing::of(self, head), Ok(Framing::UntilClose))
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.body))
    }
}

#[derive(Debug)]
pub enum HttpError {
    /// Connecting failed.
    Connect(io::Error),
    /// The server closed the connection (EOF, reset, or broken pipe on write)
    /// before any byte of the response arrived.
    ClosedBeforeResponse(String),
    /// Read or write timed out.
    Timeout(String),
    /// Anything else: a malformed or truncated response, another I/O error.
    Other(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Connect(e) => write!(f, "connect: {e}"),
            HttpError::ClosedBeforeResponse(m) => write!(f, "closed before a response: {m}"),
            HttpError::Timeout(m) => write!(f, "timeout: {m}"),
            HttpError::Other(m) => write!(f, "{m}"),
        }
    }
}

impl HttpError {
    pub(super) fn from_io(e: io::Error, got_bytes: bool, during: &str) -> HttpError {
        let msg = format!("{during}: {e}");
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HttpError::Timeout(msg),
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
                if !got_bytes =>
            {
                HttpError::ClosedBeforeResponse(msg)
            }
            _ => HttpError::Other(msg),
        }
    }
}

/// One client connection; supports keep-alive (several requests in sequence).
pub struct HttpConn {
    pub(super) reader: BufReader<UnixStream>,
    /// Responses fully read on this connection.
    pub responses: usize,
}

impl HttpConn {
    pub fn connect(path: &Path) -> Result<HttpConn, HttpError> {
        HttpConn::connect_with_timeout(path, HTTP_TIMEOUT)
    }

    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<HttpConn, HttpError> {
        let stream = UnixStream::connect(path).map_err(HttpError::Connect)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(HttpError::Connect)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(HttpError::Connect)?;
        Ok(HttpConn {
            reader: BufReader::new(stream),
            responses: 0,
        })
    }

    /// True when a response was already read on this connection (it is reused).
    pub fn is_reused(&self) -> bool {
        self.responses > 0
    }

    /// Writes raw bytes; Err when the server already closed the connection.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(bytes)?;
        stream.flush()
    }

    /// Half-closes: shuts this side's sending half, as a client that has
    /// said all it will say; responses can still be read.
    pub fn shut_write(&mut self) -> io::Result<()> {
        self.reader.get_ref().shutdown(std::net::Shutdown::Write)
    }

    /// Sends one request without a body (keep-alive is HTTP/1.1's default).
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), HttpError> {
        self.send_raw(&build_request(method, path, headers, None))
            .map_err(|e| HttpError::from_io(e, false, "writing the request"))
    }

    /// Reads one response (to a request other than HEAD).
    pub fn read_response(&mut self) -> Result<Response, HttpError> {
        self.read_response_to(false)
    }

    /// Reads one response; `head`: it answers a HEAD request (no body follows).
    pub fn read_response_to(&mut self, head: bool) -> Result<Response, HttpError> {
        let resp = parse_response(&mut self.reader, head)?;
        self.responses += 1;
        Ok(resp)
    }

    /// Sends a request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response, HttpError> {
        self.send(method, path, headers)?;
        self.read_response()
    }
}

/// The bytes of one HTTP/1.1 request: `body` gets a Content-Length unless
/// `headers` already frame it (Content-Length or Transfer-Encoding).
pub fn build_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    let framed = headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body
        && !framed
    {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    bytes
}

/// `data` as a chunked body in chunks of `size` bytes, with the final chunk.
pub fn chunked(data: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in data.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}
