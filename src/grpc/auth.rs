//! Tokens: builders (and admin clients) present `authorization: Bearer <token>`; the runner compares
//! it with the token in `[grpc] token_file`. A missing or wrong token is refused (UNAUTHENTICATED)
//! and logged with the peer's address. No token file configured: every call is refused.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Reads a token file: the first line, trimmed. An empty token is an error.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(!token.is_empty(), "token file {} is empty", path.display());
    Ok(token)
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the bearer token in `meta` against `expected` (`None`: nothing is accepted).
pub fn check(meta: &MetadataMap, expected: Option<&str>) -> Result<(), &'static str> {
    let Some(expected) = expected else {
        return Err("the runner has no token configured ([grpc] token_file)");
    };
    let Some(given) = meta.get("authorization") else {
        return Err("no token given");
    };
    let given = given
        .to_str()
        .map_err(|_| "malformed authorization header")?;
    let given = given
        .strip_prefix("Bearer ")
        .ok_or("authorization is not a bearer token")?;
    if same(given.trim().as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err("wrong token")
    }
}

/// The server's interceptor.
#[derive(Clone)]
pub struct ServerAuth {
    token: Option<Arc<str>>,
}

impl ServerAuth {
    pub fn new(token: Option<String>) -> Self {
        ServerAuth {
            token: token.map(Arc::from),
        }
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match check(req.metadata(), self.token.as_deref()) {
            Ok(()) => Ok(req),
            Err(why) => {
                let peer = req
                    .remote_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "unknown peer".into());
                tracing::warn!(peer = %peer, reason = why, "refused a gRPC call: bad token");
                Err(Status::unauthenticated(format!("refused: {why}")))
            }
        }
    }
}

/// The client's interceptor: adds the token to every call.
#[derive(Clone)]
pub struct ClientAuth {
    header: AsciiMetadataValue,
}

impl ClientAuth {
    pub fn new(token: &str) -> anyhow::Result<Self> {
        let header = format!("Bearer {token}")
            .parse()
            .context("the token must be printable ASCII")?;
        Ok(ClientAuth { header })
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = v {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn tokens() {
        assert!(check(&meta(Some("Bearer s3cret")), Some("s3cret")).is_ok());
        assert_eq!(
            check(&meta(Some("Bearer nope")), Some("s3cret")),
            Err("wrong token")
        );
        assert_eq!(check(&meta(None), Some("s3cret")), Err("no token given"));
        assert!(check(&meta(Some("s3cret")), Some("s3cret")).is_err());
        assert!(check(&meta(Some("Bearer s3cret")), None).is_err());
        let mut c = ClientAuth::new("s3cret").unwrap();
        let r = c.call(Request::new(())).unwrap();
        let mut s = ServerAuth::new(Some("s3cret".into()));
        assert!(s.call(r).is_ok());
        let mut s = ServerAuth::new(Some("other".into()));
        let r = c.call(Request::new(())).unwrap();
        assert_eq!(s.call(r).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn token_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("t");
        std::fs::write(&f, "  abc \nignored\n").unwrap();
        assert_eq!(read_token_file(&f).unwrap(), "abc");
        std::fs::write(&f, "\n").unwrap();
        assert!(read_token_file(&f).is_err());
    }
}
