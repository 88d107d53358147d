//! gRPC protocols between the runner, its builders and its operators.
//!
//! - `proto/qr/runner/v1/runner.proto`: the builder protocol ([`runner_v1`]).
//! - Server side: [`service`] (the tonic service), [`auth`] (tokens), [`hub`] (sessions by machine,
//!   quarantine), [`remote_machine`] (one actor per connected builder, a machine to the dispatcher:
//!   [`remote_core`] decides, its messages in [`remote_messages`]), [`jobs`] (its job table, a
//!   plain state machine), [`verify`] (checking uploaded outputs).
//! - Both sides: [`nar`] (NAR streams over gRPC chunks), [`codec`] (protobuf, with malformed
//!   messages refused as `INVALID_ARGUMENT`), [`clip`] (status messages of bounded size).

pub mod admin;
pub mod auth;
pub mod clip;
pub mod codec;
pub mod hub;
pub mod jobs;
pub mod nar;
pub mod remote_core;
mod remote_io;
pub mod remote_machine;
pub mod remote_messages;
mod remote_metrics;
pub mod service;
pub mod verify;

use std::collections::BTreeSet;

use crate::store::PathInfo;
use crate::store::hash::{parse_sha256, render_nix32};

/// Generated code for `proto/qr/runner/v1/runner.proto`.
pub mod runner_v1 {
    tonic::include_proto!("qr.runner.v1");
}

/// The encoded file descriptor set of every proto (for the reflection service).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/qr_descriptor.bin"));

/// This build's protocol version. A peer with another major version is refused.
pub const PROTOCOL_VERSION: runner_v1::ProtocolVersion =
    runner_v1::ProtocolVersion { major: 1, minor: 1 };

/// NAR chunk size on the wire.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Whether a peer's protocol version can talk to ours.
pub fn compatible(peer: Option<&runner_v1::ProtocolVersion>) -> Result<(), String> {
    match peer {
        Some(v) if v.major == PROTOCOL_VERSION.major => Ok(()),
        Some(v) => Err(format!(
            "incompatible protocol version {}.{} (this runner speaks {}.{})",
            v.major, v.minor, PROTOCOL_VERSION.major, PROTOCOL_VERSION.minor
        )),
        None => Err("no protocol version given".into()),
    }
}

/// A store path's info on the wire.
pub fn info_to_proto(i: &PathInfo) -> runner_v1::PathInfo {
    runner_v1::PathInfo {
        path: i.path.clone(),
        nar_hash: render_nix32(&i.nar_hash),
        nar_size: i.nar_size,
        references: i.references.iter().cloned().collect(),
        ca: i.ca.clone().unwrap_or_default(),
        deriver: i.deriver.clone().unwrap_or_default(),
    }
}

/// A store path's info from the wire.
pub fn info_from_proto(p: &runner_v1::PathInfo) -> Result<PathInfo, String> {
    let nar_hash =
        parse_sha256(&p.nar_hash).map_err(|e| format!("{}: bad narHash: {e}", p.path))?;
    Ok(PathInfo {
        path: p.path.clone(),
        nar_hash,
        nar_size: p.nar_size,
        references: p.references.iter().cloned().collect::<BTreeSet<_>>(),
        ca: (!p.ca.is_empty()).then(|| p.ca.clone()),
        deriver: (!p.deriver.is_empty()).then(|| p.deriver.clone()),
    })
}

/// Sorts path infos so that every path comes after the paths it refers to (self-references
/// aside); paths referring to something outside the set keep their relative order.
pub fn references_first(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let mut left: Vec<PathInfo> = infos;
    let mut done: BTreeSet<String> = BTreeSet::new();
    let all: BTreeSet<String> = left.iter().map(|i| i.path.clone()).collect();
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let before = left.len();
        let mut rest = Vec::new();
        for i in left {
            let ready = i
                .references
                .iter()
                .all(|r| *r == i.path || done.contains(r) || !all.contains(r));
            if ready {
                done.insert(i.path.clone());
                out.push(i);
            } else {
                rest.push(i);
            }
        }
        left = rest;
        if left.len() == before {
            // A cycle (impossible in a store): keep the order given.
            out.append(&mut left);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(p: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: p.into(),
            nar_hash: [7; 32],
            nar_size: 3,
            references: refs.iter().map(|s| s.to_string()).collect(),
            ca: None,
            deriver: None,
        }
    }

    #[test]
    fn path_info_round_trips_through_the_wire() {
        let mut i = info("/s/a", &["/s/b", "/s/a"]);
        i.ca = Some("fixed:r:sha256:x".into());
        assert_eq!(info_from_proto(&info_to_proto(&i)).unwrap(), i);
        let mut bad = info_to_proto(&i);
        bad.nar_hash = "md5:zz".into();
        assert!(info_from_proto(&bad).is_err());
    }

    #[test]
    fn references_come_first() {
        let v = references_first(vec![
            info("/s/c", &["/s/b", "/s/c"]),
            info("/s/b", &["/s/a", "/s/x"]),
            info("/s/a", &[]),
        ]);
        let order: Vec<&str> = v.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(order, ["/s/a", "/s/b", "/s/c"]);
    }

    #[test]
    fn versions() {
        assert!(compatible(Some(&PROTOCOL_VERSION)).is_ok());
        let v = runner_v1::ProtocolVersion { major: 1, minor: 9 };
        assert!(compatible(Some(&v)).is_ok());
        let v = runner_v1::ProtocolVersion { major: 2, minor: 0 };
        assert!(compatible(Some(&v)).unwrap_err().contains("incompatible"));
        assert!(compatible(None).is_err());
    }
}
