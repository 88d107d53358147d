//! Optional TLS for the gRPC endpoints: the runner's certificate and key (`[grpc] tls_cert`,
//! `tls_key`, PEM), and on the builder's side the CA to trust (`--tls-ca`) for `https://` runners.

use std::path::Path;

use anyhow::{Context as _, bail};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use super::Context;

/// The server's TLS configuration, or `None` when both files are unset.
pub fn server_config(ctx: &Context) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (cert, key) = (&ctx.config.grpc.tls_cert, &ctx.config.grpc.tls_key);
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => {
            let c =
                std::fs::read(cert).with_context(|| format!("reading [grpc] tls_cert {cert}"))?;
            let k = std::fs::read(key).with_context(|| format!("reading [grpc] tls_key {key}"))?;
            Ok(Some(
                ServerTlsConfig::new().identity(Identity::from_pem(c, k)),
            ))
        }
        _ => bail!("[grpc] tls_cert and tls_key go together: set both or neither"),
    }
}

/// The client's TLS configuration: trust `ca` (PEM) if given, else the system's roots are not
/// loaded, so `ca` is needed for a private CA; `domain` overrides the name checked.
pub fn client_config(ca: Option<&Path>, domain: Option<&str>) -> anyhow::Result<ClientTlsConfig> {
    let mut c = ClientTlsConfig::new();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        c = c.ca_certificate(Certificate::from_pem(pem));
    }
    if let Some(d) = domain {
        c = c.domain_name(d);
    }
    Ok(c)
}
