//! A plain HTTP/1.1 GET for `builtin:fetchurl` (hyper's client connection, rustls for
//! `https://`), following redirects as curl does for Nix. Certificates are not verified, as
//! Nix's builtin does not: the fixed output's hash is what is trusted.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

use super::{BuiltinError, TimeLimitHit};

/// Most redirects followed (curl's default for Nix is 10).
const MAX_REDIRECTS: usize = 10;

fn fail(url: &str, why: impl std::fmt::Display) -> BuiltinError {
    BuiltinError::Build(format!("unable to download '{url}': {why}"))
}

/// Downloads `url` into `sink`, within `timeout` overall and `max_silent` between two pieces of
/// data.
pub fn download(
    url: &str,
    sink: &mut dyn Write,
    timeout: Option<Duration>,
    max_silent: Option<Duration>,
) -> Result<(), BuiltinError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(url, format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        let work = get_following(url, sink, max_silent);
        match timeout {
            Some(t) => tokio::time::timeout(t, work)
                .await
                .map_err(|_| BuiltinError::TimedOut(TimeLimitHit::Timeout(t)))?,
            None => work.await,
        }
    })
}

async fn silent<F: std::future::Future>(
    max_silent: Option<Duration>,
    f: F,
) -> Result<F::Output, BuiltinError> {
    match max_silent {
        Some(d) => tokio::time::timeout(d, f)
            .await
            .map_err(|_| BuiltinError::TimedOut(TimeLimitHit::MaxSilent(d))),
        None => Ok(f.await),
    }
}

/// Where a `Location` header leads from `base`.
fn resolve_location(base: &Uri, location: &str) -> Result<Uri, String> {
    if location.contains("://") {
        return location
            .parse()
            .map_err(|e| format!("bad redirect {location:?}: {e}"));
    }
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{location}")
    };
    format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|e| format!("bad redirect {location:?}: {e}"))
}

async fn get_following(
    url: &str,
    sink: &mut dyn Write,
    max_silent: Option<Duration>,
) -> Result<(), BuiltinError> {
    let mut uri: Uri = url
        .parse()
        .map_err(|e| fail(url, format!("bad URL: {e}")))?;
    for _ in 0..=MAX_REDIRECTS {
        let resp = silent(max_silent, get_once(&uri))
            .await?
            .map_err(|e| fail(url, e))?;
        let status = resp.status();
        if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
            let loc = resp
                .headers()
                .get(hyper::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| fail(url, format!("HTTP {status} without a Location")))?;
            uri = resolve_location(&uri, loc).map_err(|e| fail(url, e))?;
            continue;
        }
        if !status.is_success() {
            return Err(fail(
                url,
                format!(
                    "HTTP error {} ('{}')",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                ),
            ));
        }
        let mut body = resp.into_body();
        while let Some(frame) = silent(max_silent, body.frame()).await? {
            let frame = frame.map_err(|e| fail(url, e))?;
            if let Some(data) = frame.data_ref() {
                sink.write_all(data)
                    .map_err(|e| fail(url, format!("writing: {e}")))?;
            }
        }
        return Ok(());
    }
    Err(fail(url, format!("more than {MAX_REDIRECTS} redirects")))
}

async fn get_once(uri: &Uri) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        other => return Err(format!("unsupported URL scheme {other:?}")),
    };
    let host = uri.host().ok_or("the URL has no host")?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str())
        .unwrap_or(host)
        .to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("qr/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::ACCEPT, "*/*")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let host_bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host_bare, port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    if https {
        let name = rustls::pki_types::ServerName::try_from(host_bare.to_string())
            .map_err(|e| format!("bad host name {host}: {e}"))?;
        let tls = TlsConnector::from(Arc::new(tls_config()?))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        send(TokioIo::new(tls), req).await
    } else {
        send(TokioIo::new(tcp), req).await
    }
}

async fn send<T>(
    io: T,
    req: Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "builtin:fetchurl connection");
        }
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

fn tls_config() -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
    )
}

/// Accepts any certificate (signatures are still checked), as Nix's `verifyTLS = false`.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    /// Serves each connection's canned response (after reading the request head).
    fn serve(responses: Vec<String>) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for r in responses {
                let (mut s, _) = l.accept().unwrap();
                let mut rd = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while rd.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                s.write_all(r.as_bytes()).unwrap();
            }
        });
        port
    }

    #[test]
    fn redirects_chunked_bodies_and_errors() {
        let port = serve(vec![
            "HTTP/1.1 302 Found\r\nLocation: /b/file\r\nContent-Length: 0\r\n\r\n".into(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                .into(),
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into(),
        ]);
        let mut out = Vec::new();
        download(&format!("http://127.0.0.1:{port}/a"), &mut out, None, None).unwrap();
        assert_eq!(out, b"abcde");
        let url = format!("http://127.0.0.1:{port}/missing");
        let e = download(&url, &mut Vec::new(), None, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("unable to download '{url}': HTTP error 404 ('Not Found')")
        );
        let e = download("ftp://x/y", &mut Vec::new(), None, None).unwrap_err();
        assert!(e.to_string().contains("unsupported URL scheme"), "{e}");
    }

    #[test]
    fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _keep = std::thread::spawn(move || {
            let s = l.accept();
            std::thread::sleep(Duration::from_secs(3));
            drop(s);
        });
        let e = download(
            &format!("http://127.0.0.1:{port}/"),
            &mut Vec::new(),
            None,
            Some(Duration::from_millis(300)),
        )
        .unwrap_err();
        assert!(
            matches!(e, BuiltinError::TimedOut(TimeLimitHit::MaxSilent(_))),
            "{e}"
        );
    }

    #[test]
    fn relative_redirects() {
        let base: Uri = "http://h:1/a/b?q".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "c").unwrap().to_string(),
            "http://h:1/a/c"
        );
        assert_eq!(
            resolve_location(&base, "/d").unwrap().to_string(),
            "http://h:1/d"
        );
        assert_eq!(
            resolve_location(&base, "https://x/y").unwrap().to_string(),
            "https://x/y"
        );
    }
}
