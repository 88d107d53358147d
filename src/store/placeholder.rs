//! Placeholders Nix writes into derivations for output paths that are not known yet.

use super::hash::{Sha256Hash, compress20, sha256};
use super::nix32;
use super::path::{StorePath, output_path_name};

/// `hashPlaceholder(o)`: `/` + nix32(sha256("nix-output:" + o)) — what a CA derivation's own
/// `env[o]` holds (and what `placeholder "o"` evaluates to).
pub fn hash_placeholder(output: &str) -> String {
    format!(
        "/{}",
        nix32::encode(&sha256(format!("nix-output:{output}").as_bytes()))
    )
}

/// `downstreamPlaceholder(drvPath, o)`: `/` + nix32(sha256("nix-upstream-output:" + hashPart +
/// ":" + outputPathName(drvName, o))) — what a dependent derivation sees for output `o` of a CA
/// (or deferred) input `drv_path` (Nix's `DownstreamPlaceholder::unknownCaOutput`).
pub fn downstream_placeholder(drv_path: &StorePath, output: &str) -> String {
    render(&unknown_ca_output(drv_path, output))
}

fn render(h: &Sha256Hash) -> String {
    format!("/{}", nix32::encode(h))
}

fn unknown_ca_output(drv_path: &StorePath, output: &str) -> Sha256Hash {
    let clear = format!(
        "nix-upstream-output:{}:{}",
        drv_path.hash_part(),
        output_path_name(drv_path.drv_name(), output)
    );
    sha256(clear.as_bytes())
}

/// Nix's `DownstreamPlaceholder::unknownDerivation`: output `output` of the derivation that the
/// placeholder `upstream` stands for: sha256("nix-computed-output:" + nix32(compress20(upstream))
/// + ":" + output).
fn unknown_derivation(upstream: &Sha256Hash, output: &str) -> Sha256Hash {
    let clear = format!(
        "nix-computed-output:{}:{}",
        nix32::encode(&compress20(upstream)),
        output
    );
    sha256(clear.as_bytes())
}

/// The placeholder of a dynamic output `drv_path^chain[0]^chain[1]…^output`: output `output` of
/// the derivation held by output `chain[last]` of … of the derivation held by output `chain[0]`
/// of `drv_path`. With an empty chain this is [`downstream_placeholder`].
pub fn dynamic_placeholder(drv_path: &StorePath, chain: &[String], output: &str) -> String {
    let Some((first, rest)) = chain.split_first() else {
        return downstream_placeholder(drv_path, output);
    };
    let mut h = unknown_ca_output(drv_path, first);
    for o in rest.iter().map(String::as_str).chain([output]) {
        h = unknown_derivation(&h, o);
    }
    render(&h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreDir;

    #[test]
    fn hash_placeholders() {
        // chain.json `hash_placeholders`.
        assert_eq!(
            hash_placeholder("out"),
            "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
        assert_eq!(
            hash_placeholder("dev"),
            "/02qcpld1y6xhs5gz9bchpxaw0xdhmsp5dv88lh25r2ss44kh8dxz"
        );
    }

    #[test]
    fn downstream() {
        // chain.json: `interpolated.out` of chain-a.
        let p = StoreDir::default()
            .parse("/nix/store/bb2hv5vpc898gbqnr314h9367m8ambvj-chain-a.drv")
            .unwrap();
        assert_eq!(
            downstream_placeholder(&p, "out"),
            "/1382g89hyjxy1s6s14v4dfnvlf6fa133igny84dz8n2wzxqzswyf"
        );
    }

    #[test]
    fn nix_downstream_placeholder_vectors() {
        // Nix's libstore-tests downstream-placeholder.cc: unknownCaOutput and unknownDerivation.
        let sd = StoreDir::default();
        let foo = sd
            .parse("/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv")
            .unwrap();
        assert_eq!(
            downstream_placeholder(&foo, "out"),
            "/0c6rn30q4frawknapgwq386zq358m8r6msvywcvc89n6m5p2dgbz"
        );
        assert_eq!(
            dynamic_placeholder(&foo, &[], "out"),
            downstream_placeholder(&foo, "out")
        );
        let foo_drv = sd
            .parse("/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv.drv")
            .unwrap();
        assert_eq!(
            dynamic_placeholder(&foo_drv, &["out".to_string()], "out"),
            "/0gn6agqxjyyalf0dpihgyf49xq5hqxgw100f0wydnj6yqrhqsb3w"
        );
    }
}
