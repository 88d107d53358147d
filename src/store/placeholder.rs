//! Placeholders Nix writes into derivations for output paths that are not known yet.

use super::hash::sha256;
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
/// (or deferred) input `drv_path`.
pub fn downstream_placeholder(drv_path: &StorePath, output: &str) -> String {
    let clear = format!(
        "nix-upstream-output:{}:{}",
        drv_path.hash_part(),
        output_path_name(drv_path.drv_name(), output)
    );
    format!("/{}", nix32::encode(&sha256(clear.as_bytes())))
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
}
