//! The small clients behind `notesd status`, `notesd reload`, `notesd drain` and
//! `notesd healthcheck`.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};

use crate::master::control::{Command, ReloadAnswer, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the master at {path}: {source} (is notesd running?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("reading from {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("unexpected answer from {path}: {detail}")]
    Decode { path: String, detail: String },
    #[error("GET /healthz over {path}: {detail}")]
    Health { path: String, detail: String },
}

/// How long `notesd reload` waits for the master's answer: longer than any
/// reload takes (boot attempts back off for a few seconds at most), shorter
/// than forever if the master itself hangs. systemd bounds `ExecReload=` too.
pub const RELOAD_WAIT: Duration = Duration::from_secs(300);

/// Send one command over the control socket and read the whole answer.
fn ask(control: &Path, command: Command, wait: Duration) -> Result<Vec<u8>, ClientError> {
    let path = control.display().to_string();
    let mut stream = std::os::unix::net::UnixStream::connect(control).map_err(|source| {
        ClientError::Connect {
            path: path.clone(),
            source,
        }
    })?;
    let read_err = |source| ClientError::Read {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(wait)).map_err(read_err)?;
    stream.write_all(command.line()).map_err(read_err)?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).map_err(read_err)?;
    Ok(body)
}

fn decode<T: serde::de::DeserializeOwned>(control: &Path, body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| ClientError::Decode {
        path: control.display().to_string(),
        detail: match std::str::from_utf8(body) {
            // A refusal comes as a ReloadAnswer: show its message, not a serde error.
            Ok(text) => serde_json::from_str::<ReloadAnswer>(text)
                .map(|a| a.message)
                .unwrap_or_else(|_| format!("{e}: {text:?}")),
            Err(_) => e.to_string(),
        },
    })
}

/// Ask the master for its status over the control socket.
pub fn status(control: &Path) -> Result<Status, ClientError> {
    let body = ask(control, Command::Status, Duration::from_secs(5))?;
    decode(control, &body)
}

/// Ask the master to reload and wait until the reload completed, or was
/// refused or abandoned (the answer says which).
pub fn reload(control: &Path) -> Result<ReloadAnswer, ClientError> {
    let body = ask(control, Command::Reload, RELOAD_WAIT)?;
    if body.is_empty() {
        return Err(ClientError::Decode {
            path: control.display().to_string(),
            detail: "the master closed the connection without an answer (did it exit?)".into(),
        });
    }
    decode(control, &body)
}

/// `notesd drain` (`undo`: `--undo`): the master's answer.
pub fn drain(control: &Path, undo: bool) -> Result<ReloadAnswer, ClientError> {
    let command = if undo {
        Command::Undrain
    } else {
        Command::Drain
    };
    let body = ask(control, command, Duration::from_secs(5))?;
    decode(control, &body)
}

/// GET /healthz over the unix socket (hyperlocal); Ok on 200 within 5 s.
pub fn healthcheck(socket: &Path) -> Result<(), ClientError> {
    let path = socket.display().to_string();
    let fail = |detail: String| ClientError::Health {
        path: path.clone(),
        detail,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(e.to_string()))?;
    rt.block_on(async {
        let client: Client<UnixConnector, Empty<Bytes>> = Client::unix();
        let uri: hyper::Uri = hyperlocal::Uri::new(socket, "/healthz").into();
        let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
            .await
            .map_err(|_| fail("no answer within 5 s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status == hyper::StatusCode::OK {
            Ok(())
        } else {
            Err(fail(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body)
            )))
        }
    })
}
