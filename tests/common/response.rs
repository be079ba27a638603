//! HTTP/1.1 responses from any byte stream: the parser behind every test
//! client (unix socket, TCP, through nginx).

use std::io::{self, BufRead, Read};

use super::{HttpError, Response};

const MAX_LINE: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;
const MAX_HEADERS: usize = 200;

/// The status code of an `HTTP/1.x NNN reason` line.
pub fn parse_status_line(line: &str) -> Option<u16> {
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| line.starts_with("HTTP/1."))
}

/// How the body of a response is delimited (RFC 9112 §6.3).
pub(super) enum Framing {
    /// HEAD, 1xx, 204, 304: no body, whatever the headers say.
    Empty,
    Chunked,
    Length(usize),
    /// No length: the body runs until the server closes the connection.
    UntilClose,
}

impl Framing {
    pub(super) fn of(resp: &Response, head: bool) -> Result<Framing, HttpError> {
        let status = resp.status;
        if head || status == 204 || status == 304 || (100..200).contains(&status) {
            Ok(Framing::Empty)
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Ok(Framing::Chunked)
        } else if let Some(len) = resp.header("content-length") {
            len.parse()
                .map(Framing::Length)
                .map_err(|_| HttpError::Other(format!("bad Content-Length {len:?}")))
        } else {
            Ok(Framing::UntilClose)
        }
    }
}

/// Reads one response from `reader`: the parser behind every test client
/// (`HttpConn`, `notes::Client`, `nginx::TcpClient`). `head`: it answers a
/// HEAD request (no body follows). EOF, a reset or a broken pipe before any
/// byte is `ClosedBeforeResponse`; a timeout is `Timeout`; a malformed or
/// truncated response is `Other`.
pub fn parse_response(reader: &mut impl BufRead, head: bool) -> Result<Response, HttpError> {
    let status_line = match read_line(reader) {
        Ok(Some(line)) => line,
        Ok(None) => {
            return Err(HttpError::ClosedBeforeResponse(
                "EOF before the status line".to_string(),
            ));
        }
        Err((e, got)) => return Err(HttpError::from_io(e, got, "reading the status line")),
    };
    let status = parse_status_line(&status_line)
        .ok_or_else(|| HttpError::Other(format!("bad status line {status_line:?}")))?;

    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)
            .map_err(|(e, _)| HttpError::from_io(e, true, "reading headers"))?
            .ok_or_else(|| HttpError::Other("EOF in the headers".to_string()))?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| HttpError::Other(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        if headers.len() > MAX_HEADERS {
            return Err(HttpError::Other("too many headers".to_string()));
        }
    }
    let mut resp = Response {
        status,
        headers,
        body: String::new(),
    };

    let body = match Framing::of(&resp, head)? {
        Framing::Empty => Vec::new(),
        Framing::Chunked => read_chunked(reader)?,
        Framing::Length(len) => {
            if len > MAX_BODY {
                return Err(HttpError::Other(format!("body too large: {len}")));
            }
            let mut body = vec![0; len];
            reader
                .read_exact(&mut body)
                .map_err(|e| HttpError::from_io(e, true, &format!("reading a {len}-byte body")))?;
            body
        }
        Framing::UntilClose => {
            let mut body = Vec::new();
            reader
                .take(MAX_BODY as u64)
                .read_to_end(&mut body)
                .map_err(|e| HttpError::from_io(e, true, "reading a body to EOF"))?;
            body
        }
    };
    resp.body = String::from_utf8_lossy(&body).into_owned();
    Ok(resp)
}

/// One CRLF-terminated line without its terminator; Ok(None) on EOF before
/// any byte. On error, also tells whether any byte was read.
fn read_line(reader: &mut impl BufRead) -> Result<Option<String>, (io::Error, bool)> {
    let mut buf = Vec::new();
    match reader.take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
        Ok(0) => Ok(None),
        Ok(_) if !buf.ends_with(b"\n") => Err((
            io::Error::new(io::ErrorKind::UnexpectedEof, "line truncated or too long"),
            true,
        )),
        Ok(_) => {
            while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                buf.pop();
            }
            Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
        }
        Err(e) => {
            let got = !buf.is_empty();
            Err((e, got))
        }
    }
}

fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)
            .map_err(|(e, _)| HttpError::from_io(e, true, "reading a chunk size"))?
            .ok_or_else(|| HttpError::Other("EOF in a chunked body".to_string()))?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| HttpError::Other(format!("bad chunk size line {line:?}")))?;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let t = read_line(reader)
                    .map_err(|(e, _)| HttpError::from_io(e, true, "reading trailers"))?
                    .ok_or_else(|| HttpError::Other("EOF in trailers".to_string()))?;
                if t.is_empty() {
                    return Ok(body);
                }
            }
        }
        if body.len() + size > MAX_BODY {
            return Err(HttpError::Other("chunked body too large".to_string()));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .map_err(|e| HttpError::from_io(e, true, "reading a chunk"))?;
        let mut crlf = [0u8; 2];
        reader
            .read_exact(&mut crlf)
            .map_err(|e| HttpError::from_io(e, true, "reading a chunk's CRLF"))?;
        if &crlf != b"\r\n" {
            return Err(HttpError::Other("chunk not followed by CRLF".to_string()));
        }
    }
}
