//! One webhook POST: HTTP/1.1 over hyper's client connection, rustls for `https://` (verified
//! against `[notify] ca_file`), the whole exchange within a timeout. No redirects are followed
//! (a signed delivery goes where it was configured to go).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;

/// Why a POST got no answer.
#[derive(Debug, Error)]
pub enum PostError {
    #[error("bad URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {host}: {why}")]
    Tls { host: String, why: String },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("cannot read the CA certificates {path}: {why}")]
    Roots { path: String, why: String },
}

/// A client: the TLS configuration (read once) and the timeout.
#[derive(Clone)]
pub struct Client {
    tls: Option<Arc<rustls::ClientConfig>>,
    ca_file: String,
    timeout: Duration,
}

/// Reads the PEM certificates of `path` into a root store.
fn roots(path: &Path) -> Result<rustls::RootCertStore, PostError> {
    let bad = |why: String| PostError::Roots {
        path: path.display().to_string(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut certs = Vec::new();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        certs.push(c.map_err(|e| bad(e.to_string()))?);
    }
    let mut store = rustls::RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad("no usable certificate in it".into()));
    }
    Ok(store)
}

impl Client {
    /// A client; the CA file is read now when `https` (some webhook is `https://`), so a missing
    /// file is a start-up error.
    pub fn new(ca_file: &Path, timeout: Duration, https: bool) -> Result<Client, PostError> {
        let tls = match https {
            false => None,
            true => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| PostError::Tls {
                        host: String::new(),
                        why: e.to_string(),
                    })?
                    .with_root_certificates(roots(ca_file)?)
                    .with_no_client_auth();
                Some(Arc::new(config))
            }
        };
        Ok(Client {
            tls,
            ca_file: ca_file.display().to_string(),
            timeout,
        })
    }

    /// POSTs `body` (JSON) with `headers` to `url`: the status code answered.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<u16, PostError> {
        match tokio::time::timeout(self.timeout, self.post_once(url, headers, body)).await {
            Ok(r) => r,
            Err(_) => Err(PostError::TimedOut(self.timeout)),
        }
    }

    async fn post_once(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<u16, PostError> {
        let bad = |why: String| PostError::Url {
            url: url.to_string(),
            why,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            other => return Err(bad(format!("unsupported scheme {other:?}"))),
        };
        let host = uri.host().ok_or_else(|| bad("no host".into()))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri.authority().map_or(host, |a| a.as_str()).to_string();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(
                hyper::header::USER_AGENT,
                concat!("qr/", env!("CARGO_PKG_VERSION")),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "*/*");
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| bad(e.to_string()))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((bare, port))
            .await
            .map_err(|source| PostError::Connect {
                addr: format!("{host}:{port}"),
                source,
            })?;
        if !https {
            return send(TokioIo::new(tcp), req).await;
        }
        let Some(tls) = &self.tls else {
            return Err(PostError::Roots {
                path: self.ca_file.clone(),
                why: "not loaded (no https:// webhook was configured)".into(),
            });
        };
        let tls_err = |why: String| PostError::Tls {
            host: host.to_string(),
            why,
        };
        let name = rustls::pki_types::ServerName::try_from(bare.to_string())
            .map_err(|e| tls_err(e.to_string()))?;
        let stream = TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| tls_err(e.to_string()))?;
        send(TokioIo::new(stream), req).await
    }
}

async fn send<T>(io: T, req: Request<Full<Bytes>>) -> Result<u16, PostError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "webhook connection");
        }
    });
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    // The answer's body is read (and dropped) so the exchange is complete.
    let read = resp.into_body().collect().await;
    conn.abort();
    if let Err(e) = read {
        tracing::debug!(error = %e, status, "reading a webhook's answer");
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_needs_a_readable_ca_file() {
        let missing = Path::new("/nonexistent/ca.pem");
        let e = Client::new(missing, Duration::from_secs(1), true)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = Client::new(&empty, Duration::from_secs(1), true)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("no usable certificate"), "{e}");
        // Plain http needs none.
        assert!(Client::new(missing, Duration::from_secs(1), false).is_ok());
        // The system's bundle, where there is one, loads.
        let system = Path::new("/etc/ssl/certs/ca-certificates.crt");
        if system.exists() {
            assert!(Client::new(system, Duration::from_secs(1), true).is_ok());
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_naming_the_address() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let c = Client::new(Path::new("/x"), Duration::from_secs(5), false).unwrap();
        let e = c
            .post(&format!("http://127.0.0.1:{port}/h"), &[], b"{}".to_vec())
            .await
            .expect_err("refused")
            .to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}
