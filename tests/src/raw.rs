//! A NATS client that writes the protocol by hand, byte for byte, so tests can send what no
//! well-behaved client library would: header blocks and subjects with bytes that are not valid
//! UTF-8, bare CR or LF inside a header, header lines without a colon.

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A raw connection to one nats-server, after the `CONNECT` handshake.
pub struct RawConnection {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl RawConnection {
    /// Connects to `127.0.0.1:port`, reads `INFO` and sends `CONNECT` with headers on.
    pub async fn connect(port: u16) -> Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
        let (read, writer) = stream.into_split();
        let mut connection = Self {
            reader: BufReader::new(read),
            writer,
        };
        let info = connection.line().await?;
        if !info.starts_with("INFO ") {
            bail!("expected INFO from the server, got {info:?}");
        }
        connection
            .write(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true}\r\n")
            .await?;
        connection.ping().await?;
        Ok(connection)
    }

    /// Publishes `payload` to `subject` with the raw header block `headers` (which must start
    /// with `NATS/1.0\r\n` and end with `\r\n\r\n` to be well formed; here it need not be), with
    /// `reply` as the reply subject. Subjects are raw bytes too.
    pub async fn hpub(
        &mut self,
        subject: &[u8],
        reply: &[u8],
        headers: &[u8],
        payload: &[u8],
    ) -> Result<()> {
        let mut frame = Vec::with_capacity(64 + headers.len() + payload.len());
        frame.extend_from_slice(b"HPUB ");
        frame.extend_from_slice(subject);
        frame.push(b' ');
        frame.extend_from_slice(reply);
        frame.extend_from_slice(
            format!(" {} {}\r\n", headers.len(), headers.len() + payload.len()).as_bytes(),
        );
        frame.extend_from_slice(headers);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.write(&frame).await
    }

    /// Sends `PING` and waits for `PONG`: everything written before has reached the server,
    /// and the server accepted it (a protocol violation would close the connection instead).
    pub async fn ping(&mut self) -> Result<()> {
        self.write(b"PING\r\n").await?;
        loop {
            let line = self.line().await?;
            match line.as_str() {
                "PONG" => return Ok(()),
                "PING" => self.write(b"PONG\r\n").await?,
                other if other.starts_with("-ERR") => bail!("the server refused: {other}"),
                _ => {}
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer
            .write_all(bytes)
            .await
            .context("writing to the server")
    }

    async fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self
            .reader
            .read_line(&mut line)
            .await
            .context("reading from the server")?
            == 0
        {
            bail!("the server closed the connection");
        }
        Ok(line.trim_end().to_owned())
    }
}
