//! Blocking client used by the `understudy bitmap ...` commands.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::proto::{MAX_LINE, Request, Response};

/// A connection to a server's control socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connect to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot reach the control socket {}: is `understudy serve` running with --control {}?",
                path.display(),
                path.display()
            )
        })?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            next_id: 1,
        })
    }

    /// Call `method` and return its result, or the server's error as an
    /// `anyhow` error carrying the server's message.
    pub fn call(&mut self, method: &str, params: serde_json::Value) -> Result<serde_json::Value> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            id,
            method: method.to_owned(),
            params,
        };
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .context("sending to the control socket")?;
        let mut buf = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut buf)
            .context("reading the control socket")?;
        if n == 0 {
            bail!("the server closed the control connection without answering; see its log");
        }
        let resp: Response =
            serde_json::from_str(&buf).context("the server sent a malformed response")?;
        if resp.id != id {
            bail!("response id {} does not match request id {id}", resp.id);
        }
        match (resp.ok, resp.result, resp.error) {
            (true, Some(r), _) => Ok(r),
            (true, None, _) => Ok(serde_json::Value::Null),
            (false, _, Some(e)) => bail!("{} ({})", e.message, e.code),
            (false, _, None) => bail!("the server reported an unspecified error"),
        }
    }
}
