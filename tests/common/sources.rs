//! Input sources of the fixtures: `builtins.toFile` texts recovered from each fixture's `nix_expr`.

use std::collections::BTreeMap;

use qr::store::{Derivation, StoreDir};
use serde_json::Value;

/// `builtins.toFile "NAME" "CONTENT"` occurrences in a Nix expression: name → content.
pub fn to_file_sources(expr: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = expr;
    while let Some(i) = rest.find("builtins.toFile \"") {
        rest = &rest[i + "builtins.toFile \"".len()..];
        let Some(end) = rest.find('"') else { break };
        let name = rest[..end].to_string();
        rest = rest[end + 1..].trim_start();
        let Some(body) = rest.strip_prefix('"') else {
            continue;
        };
        let mut content = String::new();
        let mut chars = body.char_indices();
        let mut consumed = body.len();
        while let Some((j, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => content.push('\n'),
                    Some((_, 't')) => content.push('\t'),
                    Some((_, 'r')) => content.push('\r'),
                    Some((_, c)) => content.push(c),
                    None => break,
                },
                '"' => {
                    consumed = j + 1;
                    break;
                }
                c => content.push(c),
            }
        }
        rest = &body[consumed..];
        out.insert(name, content);
    }
    out
}

/// The fixture's input sources that are not derivations: path → contents (from the expression),
/// each checked against its path (a text path without references, as `builtins.toFile` makes).
pub fn fixture_sources(
    fixture: &Value,
    drvs: &BTreeMap<String, Derivation>,
) -> Vec<(String, String)> {
    let sd = StoreDir::default();
    let known = to_file_sources(super::s(fixture, "/nix_expr"));
    let mut out = Vec::new();
    for d in drvs.values() {
        for src in &d.input_srcs {
            if drvs.contains_key(src) || out.iter().any(|(p, _): &(String, String)| p == src) {
                continue;
            }
            let sp = sd.parse(src).unwrap();
            let content = known
                .get(sp.name())
                .unwrap_or_else(|| panic!("source {src} is not a builtins.toFile in nix_expr"));
            assert_eq!(
                sd.print(&sd.make_text_path(sp.name(), content.as_bytes(), [])),
                *src,
                "the source's contents, as derived from nix_expr, give its path"
            );
            out.push((src.clone(), content.clone()));
        }
    }
    out
}
