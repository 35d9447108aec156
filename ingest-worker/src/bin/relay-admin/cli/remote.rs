//! The other relay: its NIP-11 document over HTTP(S) and a WebSocket session, every wait
//! bounded by the sync's timeout (a [`NoAnswer`] error when it passes).
//!
//! TLS is rustls with the Mozilla roots compiled in (`webpki-roots`), so `wss://` and
//! `https://` work the same on every machine and the build needs no OpenSSL; `--ca-file`
//! adds roots (a relay behind a private CA).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::NoAnswer;

/// Largest NIP-11 document read.
const MAX_INFO_BYTES: usize = 1 << 20;

/// The TLS client settings for the other relay (rustls, ring provider): the Mozilla roots,
/// plus every certificate in `ca_file` (PEM) when given.
pub fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let shown = path.display();
        let pem = std::fs::read(path)
            .map_err(|e| super::Usage(format!("cannot read --ca-file {shown}: {e}")))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert =
                cert.map_err(|e| super::Usage(format!("--ca-file {shown} is not PEM: {e}")))?;
            roots.add(cert).map_err(|e| {
                super::Usage(format!(
                    "--ca-file {shown} holds an unusable certificate: {e}"
                ))
            })?;
            added += 1;
        }
        if added == 0 {
            bail!(super::Usage(format!(
                "--ca-file {shown} holds no certificate"
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    // ok: ring supports the default protocol versions; a failure here is a build defect.
    Ok(Arc::new(config.expect("ring supports TLS 1.2 and 1.3")))
}

/// Waits for `fut`, or fails with [`NoAnswer`] naming `what`.
pub async fn within<T>(
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(timeout, fut).await.map_err(|_| {
        NoAnswer {
            what: what.to_owned(),
            secs: timeout.as_secs(),
        }
        .into()
    })
}

/// `ws://h/p` → (`false`, `h`, `/p`); `wss://` → TLS.
fn split_url(url: &str) -> anyhow::Result<(bool, String, String)> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("wss://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("ws://") {
        (false, rest)
    } else {
        bail!(super::Usage(format!(
            "--relay must start with ws:// or wss://, got {url}"
        )));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!(super::Usage(format!("--relay has no host: {url}")));
    }
    Ok((tls, authority.to_owned(), path.to_owned()))
}

/// The relay's NIP-11 `supported_nips`; empty when it serves no NIP-11 document.
pub async fn supported_nips(
    url: &str,
    timeout: Duration,
    tls: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<Vec<u64>> {
    let (is_tls, authority, path) = split_url(url)?;
    let tls = is_tls.then(|| Arc::clone(tls));
    let body = within(
        timeout,
        &format!("NIP-11 document of {url}"),
        http_get(tls, &authority, &path),
    )
    .await??;
    let Some(body) = body else {
        return Ok(Vec::new());
    };
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    Ok(doc
        .get("supported_nips")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default())
}

/// An HTTP/1.0 GET with `Accept: application/nostr+json` (1.0: the body ends with the
/// connection, never chunked), over TLS with `tls` when given. `None` unless the status is 200.
async fn http_get(
    tls: Option<Arc<rustls::ClientConfig>>,
    authority: &str,
    path: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:{}", if tls.is_some() { 443 } else { 80 })
    };
    let tcp = TcpStream::connect(&addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/nostr+json\r\n\r\n"
    );
    let response = if let Some(config) = tls {
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .with_context(|| format!("bad host name {host}"))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {authority} failed"))?;
        exchange(stream, &request).await?
    } else {
        exchange(tcp, &request).await?
    };
    let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let status = String::from_utf8_lossy(&response[..split]);
    let ok = status
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("200");
    Ok(ok.then(|| response[split + 4..].to_vec()))
}

async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    request: &str,
) -> anyhow::Result<Vec<u8>> {
    stream.write_all(request.as_bytes()).await?;
    let mut body = Vec::new();
    (&mut stream)
        .take(MAX_INFO_BYTES as u64)
        .read_to_end(&mut body)
        .await?;
    Ok(body)
}

/// A WebSocket session with the other relay.
pub struct Remote {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    timeout: Duration,
    /// The relay's URL.
    pub url: String,
}

impl Remote {
    /// Connects (the handshake bounded by `timeout`; `wss://` with `tls`).
    pub async fn connect(
        url: &str,
        timeout: Duration,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        split_url(url)?;
        let (ws, _) = within(
            timeout,
            &format!("connecting to {url}"),
            tokio_tungstenite::connect_async_tls_with_config(
                url,
                None,
                false,
                Some(Connector::Rustls(tls)),
            ),
        )
        .await?
        .with_context(|| format!("cannot connect to {url}"))?;
        Ok(Remote {
            ws,
            timeout,
            url: url.to_owned(),
        })
    }

    /// Sends one text frame.
    pub async fn send(&mut self, text: String) -> anyhow::Result<()> {
        within(self.timeout, "sending", self.ws.send(Message::text(text)))
            .await?
            .context("the relay closed the connection")
    }

    /// The next message as a JSON array (`AUTH` challenges and `NOTICE`s are skipped,
    /// notices logged); `what` names the wait in a timeout error.
    pub async fn recv(&mut self, what: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        loop {
            let frame = within(self.timeout, what, self.ws.next()).await?;
            let text = match frame {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None => {
                    bail!("{} closed the connection", self.url)
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e).context("WebSocket failed"),
            };
            let Ok(items) = serde_json::from_str::<Vec<serde_json::Value>>(&text) else {
                continue;
            };
            match items.first().and_then(|v| v.as_str()) {
                Some("AUTH") => continue,
                Some("NOTICE") => {
                    let notice = items.get(1).map(|v| v.to_string()).unwrap_or_default();
                    eprintln!("{}: NOTICE {notice}", self.url);
                    continue;
                }
                _ => return Ok(items),
            }
        }
    }

    /// Closes the session politely.
    pub async fn close(mut self) {
        let _ = within(self.timeout, "closing", self.ws.close(None)).await;
    }
}
