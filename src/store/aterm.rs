//! The ATerm text of a `.drv`:
//! `Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])`, or, for a
//! derivation with dynamic inputs (outputs of derivations that are themselves built),
//! `DrvWithVersion("xp-dyn-drv",[outputs],…)`, where an input drv entry may be
//! `(path,([outputs],[(outputName,node),…]))` and each node is again `[outputs]` or that pair.
//!
//! The parser accepts exactly the canonical form Nix writes, so that for every input it accepts,
//! printing the result gives back the identical bytes (and hence the same drv path):
//! - strings escape exactly `"` `\` newline CR tab (`\"` `\\` `\n` `\r` `\t`); any other escape,
//!   or a raw newline/CR/tab inside a string, is an error;
//! - outputs, input drvs (and each one's output names), input sources and env are strictly sorted
//!   (no duplicates);
//! - every output tuple is one of Nix's four shapes (input-addressed, fixed, floating, deferred),
//!   hash algorithms are known and fixed hashes are lower-case hex of the algorithm's length;
//! - paths are absolute; nothing may follow the closing `)`;
//! - `DrvWithVersion("xp-dyn-drv",…)` only when some input is dynamic, and a node's pair form
//!   only when it has dynamic outputs (Nix prints the plain list otherwise).
//!
//! The printer escapes every string the same way. (Nix prints output fields and input paths
//! without escaping; they never contain characters that need it, so the bytes are identical for
//! every real derivation, and ours stay parseable for arbitrary strings.)
//!
//! Parsing is a single linear pass; only dynamic input nodes nest, to at most [`MAX_DYNAMIC_DEPTH`]
//! levels, and every failure is a [`ParseError`] carrying the byte offset and what was expected.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use thiserror::Error;

use super::derivation::{
    Derivation, DerivationOutput, DynamicNode, is_valid_fixed_hash, split_method_algo,
};

/// How deeply dynamic input nodes may nest (a bound on the parser's recursion).
pub const MAX_DYNAMIC_DEPTH: usize = 64;

/// The version string of the ATerm form with dynamic inputs.
pub const DYN_DRV_VERSION: &str = "xp-dyn-drv";

/// What went wrong while parsing an ATerm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// Another byte was found where this was expected.
    Expected(&'static str),
    /// The input ended where this was expected.
    UnexpectedEof(&'static str),
    /// A backslash not followed by one of `"` `\` `n` `r` `t`.
    BadEscape,
    /// A raw newline, carriage return or tab inside a string (Nix always escapes them).
    UnescapedControl,
    /// A string is not valid UTF-8.
    InvalidUtf8,
    /// An entry of this list is out of order or a duplicate.
    NotSorted(&'static str),
    /// This field must be an absolute path.
    NotAbsolute(&'static str),
    /// An output tuple that is none of Nix's output shapes.
    BadOutput(&'static str),
    /// Bytes after the closing `)`.
    TrailingData,
    /// A form Nix would never print for this derivation (e.g. `DrvWithVersion` without dynamic
    /// inputs, or a dynamic node's pair form with no dynamic outputs).
    NotCanonical(&'static str),
    /// Dynamic input nodes nested deeper than [`MAX_DYNAMIC_DEPTH`].
    TooDeep,
}

impl fmt::Display for ParseErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseErrorKind::Expected(what) => write!(f, "expected {what}"),
            ParseErrorKind::UnexpectedEof(what) => {
                write!(f, "unexpected end of input, expected {what}")
            }
            ParseErrorKind::BadEscape => write!(
                f,
                "invalid escape sequence (only \\\" \\\\ \\n \\r \\t are allowed)"
            ),
            ParseErrorKind::UnescapedControl => {
                write!(f, "unescaped newline, carriage return or tab in string")
            }
            ParseErrorKind::InvalidUtf8 => write!(f, "invalid UTF-8 in string"),
            ParseErrorKind::NotSorted(what) => {
                write!(f, "{what} not strictly sorted (out of order or duplicate)")
            }
            ParseErrorKind::NotAbsolute(what) => write!(f, "expected an absolute path in {what}"),
            ParseErrorKind::BadOutput(why) => write!(f, "invalid output: {why}"),
            ParseErrorKind::TrailingData => write!(f, "unexpected data after the derivation"),
            ParseErrorKind::NotCanonical(why) => write!(f, "not the canonical form: {why}"),
            ParseErrorKind::TooDeep => write!(
                f,
                "dynamic inputs nested deeper than {MAX_DYNAMIC_DEPTH} levels"
            ),
        }
    }
}

/// An ATerm parse error: `expected '(' at byte 17`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{kind} at byte {offset}")]
pub struct ParseError {
    /// Byte offset in the input where the problem was found.
    pub offset: usize,
    pub kind: ParseErrorKind,
}

type Result<T> = std::result::Result<T, ParseError>;

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn err_at(&self, offset: usize, kind: ParseErrorKind) -> ParseError {
        ParseError { offset, kind }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn expect(&mut self, b: u8, what: &'static str) -> Result<()> {
        match self.peek() {
            Some(c) if c == b => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => Err(self.err_at(self.pos, ParseErrorKind::Expected(what))),
            None => Err(self.err_at(self.pos, ParseErrorKind::UnexpectedEof(what))),
        }
    }

    fn expect_lit(&mut self, lit: &[u8], what: &'static str) -> Result<()> {
        let rest = &self.s[self.pos..];
        if rest.starts_with(lit) {
            self.pos += lit.len();
            Ok(())
        } else if lit.starts_with(rest) {
            // Like every end-of-input error: reported where the input ends.
            Err(self.err_at(self.s.len(), ParseErrorKind::UnexpectedEof(what)))
        } else {
            Err(self.err_at(self.pos, ParseErrorKind::Expected(what)))
        }
    }

    /// A quoted string; returns it and the offset of its opening quote.
    fn string(&mut self) -> Result<(String, usize)> {
        let start = self.pos;
        self.expect(b'"', "'\"'")?;
        let mut buf = String::new();
        loop {
            let rest = &self.s[self.pos..];
            let Some(i) = rest
                .iter()
                .position(|&b| matches!(b, b'"' | b'\\' | b'\n' | b'\r' | b'\t'))
            else {
                self.pos = self.s.len();
                return Err(self.err_at(self.pos, ParseErrorKind::UnexpectedEof("'\"'")));
            };
            // Chunks are split at ASCII bytes, so no UTF-8 sequence spans two chunks.
            match std::str::from_utf8(&rest[..i]) {
                Ok(chunk) => buf.push_str(chunk),
                Err(e) => {
                    return Err(
                        self.err_at(self.pos + e.valid_up_to(), ParseErrorKind::InvalidUtf8)
                    );
                }
            }
            self.pos += i;
            match rest[i] {
                b'"' => {
                    self.pos += 1;
                    return Ok((buf, start));
                }
                b'\\' => {
                    let c = match self.s.get(self.pos + 1) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(_) => return Err(self.err_at(self.pos, ParseErrorKind::BadEscape)),
                        None => {
                            return Err(self.err_at(
                                self.pos + 1,
                                ParseErrorKind::UnexpectedEof("an escaped character"),
                            ));
                        }
                    };
                    buf.push(c);
                    self.pos += 2;
                }
                _ => return Err(self.err_at(self.pos, ParseErrorKind::UnescapedControl)),
            }
        }
    }

    fn path(&mut self, what: &'static str) -> Result<(String, usize)> {
        let (s, at) = self.string()?;
        if !s.starts_with('/') {
            return Err(self.err_at(at, ParseErrorKind::NotAbsolute(what)));
        }
        Ok((s, at))
    }

    /// `[item,item,…]`, calling `item` for each element.
    fn list(&mut self, mut item: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        self.expect(b'[', "'['")?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(_) => {
                    return Err(self.err_at(self.pos, ParseErrorKind::Expected("',' or ']'")));
                }
                None => {
                    return Err(self.err_at(self.pos, ParseErrorKind::UnexpectedEof("',' or ']'")));
                }
            }
        }
    }

    /// A list of strings that must be strictly sorted.
    fn sorted_strings(&mut self, what: &'static str, paths: bool) -> Result<BTreeSet<String>> {
        let mut set = BTreeSet::new();
        self.list(|p| {
            let (s, at) = if paths { p.path(what)? } else { p.string()? };
            if set.last().is_some_and(|last: &String| *last >= s) {
                return Err(p.err_at(at, ParseErrorKind::NotSorted(what)));
            }
            set.insert(s);
            Ok(())
        })?;
        Ok(set)
    }

    fn output(&mut self) -> Result<(String, DerivationOutput, usize)> {
        let start = self.pos;
        self.expect(b'(', "'('")?;
        let (name, _) = self.string()?;
        self.expect(b',', "','")?;
        let (path, path_at) = self.string()?;
        self.expect(b',', "','")?;
        let (algo, algo_at) = self.string()?;
        self.expect(b',', "','")?;
        let (hash, hash_at) = self.string()?;
        self.expect(b')', "')'")?;
        let bad = |at, why| {
            Err(ParseError {
                offset: at,
                kind: ParseErrorKind::BadOutput(why),
            })
        };
        let need_abs = |p: &str| -> Result<()> {
            if p.starts_with('/') {
                Ok(())
            } else {
                Err(ParseError {
                    offset: path_at,
                    kind: ParseErrorKind::NotAbsolute("outputs"),
                })
            }
        };
        let out = if algo.is_empty() {
            if !hash.is_empty() {
                return bad(hash_at, "a hash without a hash algorithm");
            }
            if path.is_empty() {
                DerivationOutput::Deferred
            } else {
                need_abs(&path)?;
                DerivationOutput::InputAddressed { path }
            }
        } else {
            if split_method_algo(&algo).is_none() {
                return bad(algo_at, "unknown hash method or algorithm");
            }
            if hash.is_empty() {
                if !path.is_empty() {
                    return bad(path_at, "a floating content-addressed output with a path");
                }
                DerivationOutput::CaFloating { method_algo: algo }
            } else {
                if !is_valid_fixed_hash(&algo, &hash) {
                    return bad(
                        hash_at,
                        "fixed hash is not lower-case hex of the right length",
                    );
                }
                if path.is_empty() {
                    return bad(path_at, "a fixed output without a path");
                }
                need_abs(&path)?;
                DerivationOutput::CaFixed {
                    method_algo: algo,
                    hash,
                    path,
                }
            }
        };
        Ok((name, out, start))
    }

    /// A dynamic node's children: `[(name,node),…]`, strictly sorted by name.
    fn dynamic_children(&mut self, depth: usize) -> Result<BTreeMap<String, DynamicNode>> {
        let mut children: BTreeMap<String, DynamicNode> = BTreeMap::new();
        self.list(|p| {
            p.expect(b'(', "'('")?;
            let (name, at) = p.string()?;
            if children.last_key_value().is_some_and(|(k, _)| *k >= name) {
                return Err(p.err_at(at, ParseErrorKind::NotSorted("dynamic outputs")));
            }
            p.expect(b',', "','")?;
            let node = p.node(depth + 1)?;
            p.expect(b')', "')'")?;
            children.insert(name, node);
            Ok(())
        })?;
        Ok(children)
    }

    /// An input node of the versioned form: `[outputs]` or `([outputs],[(name,node),…])`.
    fn node(&mut self, depth: usize) -> Result<DynamicNode> {
        if depth > MAX_DYNAMIC_DEPTH {
            return Err(self.err_at(self.pos, ParseErrorKind::TooDeep));
        }
        if self.peek() != Some(b'(') {
            return Ok(DynamicNode {
                outputs: self.sorted_strings("input derivation outputs", false)?,
                dynamic_outputs: BTreeMap::new(),
            });
        }
        self.pos += 1;
        let outputs = self.sorted_strings("input derivation outputs", false)?;
        self.expect(b',', "','")?;
        let at = self.pos;
        let dynamic_outputs = self.dynamic_children(depth)?;
        if dynamic_outputs.is_empty() {
            return Err(self.err_at(
                at,
                ParseErrorKind::NotCanonical("a dynamic node with no dynamic outputs"),
            ));
        }
        self.expect(b')', "')'")?;
        Ok(DynamicNode {
            outputs,
            dynamic_outputs,
        })
    }

    fn derivation(&mut self) -> Result<Derivation> {
        let mut drv = Derivation::default();
        let start = self.pos;
        let versioned = if self.s[self.pos..].starts_with(b"DrvWithVersion(") {
            self.pos += b"DrvWithVersion(".len();
            let (v, at) = self.string()?;
            if v != DYN_DRV_VERSION {
                return Err(self.err_at(at, ParseErrorKind::Expected("\"xp-dyn-drv\"")));
            }
            self.expect(b',', "','")?;
            true
        } else {
            self.expect_lit(b"Derive(", "'Derive('")?;
            false
        };

        self.list(|p| {
            let (name, out, at) = p.output()?;
            if drv
                .outputs
                .last_key_value()
                .is_some_and(|(k, _)| *k >= name)
            {
                return Err(p.err_at(at, ParseErrorKind::NotSorted("outputs")));
            }
            drv.outputs.insert(name, out);
            Ok(())
        })?;
        self.expect(b',', "','")?;

        self.list(|p| {
            p.expect(b'(', "'('")?;
            let (path, at) = p.path("inputDrvs")?;
            if drv
                .input_drvs
                .last_key_value()
                .is_some_and(|(k, _)| *k >= path)
            {
                return Err(p.err_at(at, ParseErrorKind::NotSorted("inputDrvs")));
            }
            p.expect(b',', "','")?;
            if versioned {
                let node = p.node(1)?;
                if !node.dynamic_outputs.is_empty() {
                    drv.dynamic_inputs
                        .insert(path.clone(), node.dynamic_outputs);
                }
                drv.input_drvs.insert(path, node.outputs);
            } else {
                let outs = p.sorted_strings("input derivation outputs", false)?;
                drv.input_drvs.insert(path, outs);
            }
            p.expect(b')', "')'")?;
            Ok(())
        })?;
        if versioned && drv.dynamic_inputs.is_empty() {
            return Err(self.err_at(
                start,
                ParseErrorKind::NotCanonical("'DrvWithVersion' without dynamic inputs"),
            ));
        }
        self.expect(b',', "','")?;

        drv.input_srcs = self.sorted_strings("inputSrcs", true)?;
        self.expect(b',', "','")?;
        drv.system = self.string()?.0;
        self.expect(b',', "','")?;
        drv.builder = self.string()?.0;
        self.expect(b',', "','")?;
        self.list(|p| {
            drv.args.push(p.string()?.0);
            Ok(())
        })?;
        self.expect(b',', "','")?;
        self.list(|p| {
            p.expect(b'(', "'('")?;
            let (k, at) = p.string()?;
            if drv.env.last_key_value().is_some_and(|(last, _)| *last >= k) {
                return Err(p.err_at(at, ParseErrorKind::NotSorted("env")));
            }
            p.expect(b',', "','")?;
            let (v, _) = p.string()?;
            p.expect(b')', "')'")?;
            drv.env.insert(k, v);
            Ok(())
        })?;
        self.expect(b')', "')'")?;
        if self.pos != self.s.len() {
            return Err(self.err_at(self.pos, ParseErrorKind::TrailingData));
        }
        Ok(drv)
    }
}

/// Parses an ATerm; the derivation's name is taken from `env["name"]` (empty if absent).
pub fn parse(input: &[u8]) -> Result<Derivation> {
    let mut drv = Parser { s: input, pos: 0 }.derivation()?;
    drv.name = drv.env.get("name").cloned().unwrap_or_default();
    Ok(drv)
}

/// Parses an ATerm read from a drv file whose derivation name (file name without hash part and
/// `.drv`) is `name`.
pub fn parse_named(input: &[u8], name: &str) -> Result<Derivation> {
    let mut drv = Parser { s: input, pos: 0 }.derivation()?;
    drv.name = name.to_string();
    Ok(drv)
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    let mut last = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            _ => continue,
        };
        out.push_str(&s[last..i]);
        out.push_str(esc);
        last = i + 1;
    }
    out.push_str(&s[last..]);
    out.push('"');
}

fn write_list<'s>(out: &mut String, items: impl IntoIterator<Item = &'s str>) {
    out.push('[');
    for (i, s) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, s);
    }
    out.push(']');
}

/// Prints `drv`; with `mask`, output paths and output env vars are blank; `input_drvs` replaces
/// the input derivations (hash modulo passes hex hashes here).
fn write(
    out: &mut String,
    drv: &Derivation,
    mask: bool,
    input_drvs: &BTreeMap<String, BTreeSet<String>>,
    dynamic: &BTreeMap<String, BTreeMap<String, DynamicNode>>,
) {
    if dynamic.values().any(|m| !m.is_empty()) {
        out.push_str("DrvWithVersion(");
        write_string(out, DYN_DRV_VERSION);
        out.push_str(",[");
    } else {
        out.push_str("Derive([");
    }
    for (i, (name, o)) in drv.outputs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('(');
        write_string(out, name);
        let (path, algo, hash) = match o {
            DerivationOutput::InputAddressed { path } => (path.as_str(), "", ""),
            DerivationOutput::CaFixed {
                method_algo,
                hash,
                path,
            } => (path.as_str(), method_algo.as_str(), hash.as_str()),
            DerivationOutput::CaFloating { method_algo } => ("", method_algo.as_str(), ""),
            DerivationOutput::Deferred => ("", "", ""),
        };
        for field in [if mask { "" } else { path }, algo, hash] {
            out.push(',');
            write_string(out, field);
        }
        out.push(')');
    }
    out.push_str("],[");
    for (i, (path, outs)) in input_drvs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('(');
        write_string(out, path);
        out.push(',');
        match dynamic.get(path) {
            Some(children) if !children.is_empty() => write_node(out, outs, children),
            _ => write_list(out, outs.iter().map(String::as_str)),
        }
        out.push(')');
    }
    out.push_str("],");
    write_list(out, drv.input_srcs.iter().map(String::as_str));
    out.push(',');
    write_string(out, &drv.system);
    out.push(',');
    write_string(out, &drv.builder);
    out.push(',');
    write_list(out, drv.args.iter().map(String::as_str));
    out.push_str(",[");
    for (i, (k, v)) in drv.env.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('(');
        write_string(out, k);
        out.push(',');
        let v = if mask && drv.outputs.contains_key(k) {
            ""
        } else {
            v
        };
        write_string(out, v);
        out.push(')');
    }
    out.push_str("])");
}

/// `([outputs],[(name,node),…])`, a node printed as the plain list when it has no children.
fn write_node(out: &mut String, outs: &BTreeSet<String>, children: &BTreeMap<String, DynamicNode>) {
    out.push('(');
    write_list(out, outs.iter().map(String::as_str));
    out.push_str(",[");
    for (i, (name, node)) in children.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('(');
        write_string(out, name);
        out.push(',');
        if node.dynamic_outputs.is_empty() {
            write_list(out, node.outputs.iter().map(String::as_str));
        } else {
            write_node(out, &node.outputs, &node.dynamic_outputs);
        }
        out.push(')');
    }
    out.push_str("])");
}

fn size_hint(drv: &Derivation) -> usize {
    let strs = drv
        .env
        .iter()
        .map(|(k, v)| k.len() + v.len() + 8)
        .chain(drv.args.iter().map(|a| a.len() + 3))
        .chain(drv.input_srcs.iter().map(|a| a.len() + 3))
        .chain(drv.input_drvs.keys().map(|a| a.len() + 16))
        .chain(drv.outputs.keys().map(|a| a.len() + 100))
        .sum::<usize>();
    strs + drv.builder.len() + drv.system.len() + 32
}

/// The ATerm text of `drv`, exactly as Nix writes it.
pub fn print(drv: &Derivation) -> String {
    let mut out = String::with_capacity(size_hint(drv));
    write(&mut out, drv, false, &drv.input_drvs, &drv.dynamic_inputs);
    out
}

/// The ATerm `hashDerivationModulo` hashes: input derivations replaced by `input_hashes`
/// (hex modulo hash → output names) and, with `mask`, output paths and output env vars blank.
pub fn print_modulo(
    drv: &Derivation,
    mask: bool,
    input_hashes: &BTreeMap<String, BTreeSet<String>>,
) -> String {
    let mut out = String::with_capacity(size_hint(drv));
    write(&mut out, drv, mask, input_hashes, &BTreeMap::new());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::tests_seed::CHAIN_B;

    fn err(s: &str) -> ParseError {
        parse(s.as_bytes()).expect_err("should not parse")
    }

    #[test]
    fn round_trip() {
        let d = parse(CHAIN_B.as_bytes()).unwrap();
        assert_eq!(d.name, "chain-b");
        assert_eq!(print(&d), CHAIN_B);
        assert_eq!(d.input_drvs.len(), 1);
        assert!(matches!(
            d.outputs["out"],
            DerivationOutput::CaFloating { ref method_algo } if method_algo == "r:sha256"
        ));
    }

    #[test]
    fn escapes() {
        let mut d = parse(CHAIN_B.as_bytes()).unwrap();
        d.args.push("a\"b\\c\nd\re\tf — ü".into());
        d.env.insert("x\ty".into(), "\"".into());
        let text = print(&d);
        assert!(text.contains(r#""a\"b\\c\nd\re\tf — ü""#));
        assert!(text.contains(r#"("x\ty","\"")"#));
        assert_eq!(parse(text.as_bytes()).unwrap(), d);
    }

    #[test]
    fn error_offsets() {
        assert_eq!(
            err("").to_string(),
            "unexpected end of input, expected 'Derive(' at byte 0"
        );
        assert_eq!(err("Derive[").to_string(), "expected 'Derive(' at byte 0");
        assert_eq!(err("Derive(x").to_string(), "expected '[' at byte 7");
        assert_eq!(
            err("Derive([(\"out\"").to_string(),
            "unexpected end of input, expected ',' at byte 14"
        );
        assert_eq!(err("Derive([x").to_string(), "expected '(' at byte 8");
        let e = err(&CHAIN_B.replace("\"PATH\"", "\"P\\xTH\""));
        assert_eq!(e.kind, ParseErrorKind::BadEscape);
        assert_eq!(&CHAIN_B.as_bytes()[e.offset..e.offset + 2], b"AT");
        let e = err(&format!("{CHAIN_B}\n"));
        assert_eq!(e.kind, ParseErrorKind::TrailingData);
        assert_eq!(e.offset, CHAIN_B.len());
        let e = err(&CHAIN_B.replace("echo ", "echo\n"));
        assert_eq!(e.kind, ParseErrorKind::UnescapedControl);
        let mut bytes = CHAIN_B.as_bytes().to_vec();
        let at = CHAIN_B.find("x86_64").unwrap();
        bytes[at] = 0xff;
        let e = parse(&bytes).unwrap_err();
        assert_eq!((e.offset, e.kind), (at, ParseErrorKind::InvalidUtf8));
    }

    #[test]
    fn rejects_non_canonical() {
        let e = err(&CHAIN_B.replace(
            r#"("PATH","/usr/bin:/bin"),("builder","/bin/sh")"#,
            r#"("builder","/bin/sh"),("PATH","/usr/bin:/bin")"#,
        ));
        assert_eq!(e.kind, ParseErrorKind::NotSorted("env"));
        let e = err(&CHAIN_B.replace("[\"out\"])", "[\"out\",\"out\"])"));
        assert_eq!(
            e.kind,
            ParseErrorKind::NotSorted("input derivation outputs")
        );
        let e = err(&CHAIN_B.replace("\"r:sha256\"", "\"r:crc\""));
        assert!(matches!(e.kind, ParseErrorKind::BadOutput(_)));
        let e = err(&CHAIN_B.replace("(\"out\",\"\",\"r:sha256\"", "(\"out\",\"/x\",\"r:sha256\""));
        assert!(matches!(e.kind, ParseErrorKind::BadOutput(_)));
        let e = err(&CHAIN_B.replace("\"/nix/store/bb2", "\"nix/store/bb2"));
        assert_eq!(e.kind, ParseErrorKind::NotAbsolute("inputDrvs"));
    }

    const DYN_DEP: &str = include_str!("../../tests/data/dyn-drv/dyn-dep-derivation.drv");
    const DYN_DEP_JSON: &str = include_str!("../../tests/data/dyn-drv/dyn-dep-derivation.json");
    const BAD_OLD_DYN: &str = include_str!("../../tests/data/dyn-drv/bad-old-version-dyn-deps.drv");

    #[test]
    fn nix_dyn_dep_derivation_round_trips() {
        let d = parse_named(DYN_DEP.as_bytes(), "dyn-dep-derivation").unwrap();
        let dep2 = "/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep2.drv";
        assert_eq!(
            d.input_drvs[dep2],
            BTreeSet::from(["cat".to_string(), "dog".to_string()])
        );
        let dynamic = &d.dynamic_inputs[dep2];
        assert_eq!(
            dynamic.keys().collect::<Vec<_>>(),
            [&"cat".to_string(), &"goose".to_string()]
        );
        assert_eq!(
            dynamic["goose"].outputs,
            BTreeSet::from(["gosling".to_string()])
        );
        assert!(d.has_dynamic_inputs() && d.needs_resolution());
        let wants: Vec<String> = d
            .dynamic_wants()
            .into_iter()
            .map(|(p, c, o)| format!("{p}^{}^{o}", c.join("^")))
            .collect();
        assert_eq!(
            wants,
            [
                format!("{dep2}^cat^kitten"),
                format!("{dep2}^goose^gosling")
            ]
        );
        assert_eq!(print(&d), DYN_DEP);
        // The same derivation in Nix's version-4 JSON.
        let v: serde_json::Value = serde_json::from_str(DYN_DEP_JSON).unwrap();
        let j = Derivation::from_show_json(&v, None, &crate::store::StoreDir::default()).unwrap();
        assert_eq!(j, d);
        assert_eq!(print(&j), DYN_DEP);
    }

    #[test]
    fn dynamic_forms_only_where_nix_prints_them() {
        // The pair form needs the versioned header.
        let e = err(BAD_OLD_DYN);
        assert_eq!(e.kind, ParseErrorKind::Expected("'['"));
        // The versioned header needs a dynamic input.
        let e = err(&CHAIN_B.replacen("Derive(", "DrvWithVersion(\"xp-dyn-drv\",", 1));
        assert!(matches!(e.kind, ParseErrorKind::NotCanonical(_)));
        assert_eq!(e.offset, 0);
        // A pair with no dynamic outputs is printed as the plain list.
        let e = err(&DYN_DEP.replace(r#"("goose",["gosling"])"#, r#"("goose",(["gosling"],[]))"#));
        assert!(matches!(e.kind, ParseErrorKind::NotCanonical(_)));
        let e = err(&DYN_DEP.replace("xp-dyn-drv", "xp-dyn-drv-2"));
        assert!(matches!(e.kind, ParseErrorKind::Expected(_)));
        let e = err(&DYN_DEP.replace(
            r#"("cat",["kitten"]),("goose",["gosling"])"#,
            r#"("goose",["gosling"]),("cat",["kitten"])"#,
        ));
        assert_eq!(e.kind, ParseErrorKind::NotSorted("dynamic outputs"));
        // Depth 3 round-trips; nesting past the bound is an error, not a stack overflow.
        let deep = DYN_DEP.replace(
            r#"("goose",["gosling"])"#,
            r#"("goose",(["gosling"],[("a.drv",([],[("b.drv",["out"])]))]))"#,
        );
        let d = parse(deep.as_bytes()).unwrap();
        assert_eq!(print(&d), deep);
        assert_eq!(
            d.dynamic_inputs.values().next().unwrap()["goose"].depth(),
            3
        );
        let mut nest = String::from(r#"["x"]"#);
        for _ in 0..MAX_DYNAMIC_DEPTH + 1 {
            nest = format!(r#"([],[("o",{nest})])"#);
        }
        let e = err(&DYN_DEP.replace(
            r#"(["cat","dog"],[("cat",["kitten"]),("goose",["gosling"])])"#,
            &nest,
        ));
        assert_eq!(e.kind, ParseErrorKind::TooDeep);
    }

    #[test]
    fn masked_printing() {
        let d = parse(
            br#"Derive([("out","/nix/store/9g88l3kmpnlsx5wamsbfm5h9s30i7ba3-mx-ia-leaf","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo ia-leaf > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","mx-ia-leaf"),("out","/nix/store/9g88l3kmpnlsx5wamsbfm5h9s30i7ba3-mx-ia-leaf"),("system","x86_64-linux")])"#,
        )
        .unwrap();
        let m = print_modulo(&d, true, &BTreeMap::new());
        assert!(m.starts_with(r#"Derive([("out","","","")]"#));
        assert!(m.contains(r#"("out","")"#));
        let mut inputs = BTreeMap::new();
        inputs.insert("abc".to_string(), BTreeSet::from(["out".to_string()]));
        let m = print_modulo(&d, false, &inputs);
        assert!(m.contains(r#"],[("abc",["out"])],[]"#));
    }

    #[test]
    fn large_inputs_are_linear() {
        // 200k args and 50k env entries, many escapes: must parse quickly (no quadratic work).
        let mut d = parse(CHAIN_B.as_bytes()).unwrap();
        d.args = (0..200_000).map(|i| format!("a\"{i}\\\n")).collect();
        for i in 0..50_000 {
            d.env.insert(format!("k{i:06}"), "v\t".repeat(10));
        }
        d.builder = "\"".repeat(1 << 20);
        let text = print(&d);
        let t = std::time::Instant::now();
        let back = parse(text.as_bytes()).unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        assert_eq!(back, d);
        // A long unterminated string fails at its end, quickly.
        let mut bad = b"Derive([],[],[],\"".to_vec();
        bad.extend(std::iter::repeat_n(b'x', 1 << 22));
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.offset, bad.len());
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    const SEEDS: &[&str] = &[
        super::tests_seed::CHAIN_B,
        include_str!("../../tests/data/dyn-drv/dyn-dep-derivation.drv"),
        r#"Derive([("out","/nix/store/ys815iw6x4amdbmrqjzficz815kkixhy-mx-fod","sha256","2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")],[],[],"x86_64-linux","/bin/sh",["-c","printf hello > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","mx-fod"),("out","/nix/store/ys815iw6x4amdbmrqjzficz815kkixhy-mx-fod"),("outputHash","2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"),("outputHashAlgo","sha256"),("system","x86_64-linux")])"#,
        r#"Derive([("dev","","r:sha256",""),("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","a\"b\\c\nd\re\tf"],[("dev","/02qcpld1y6xhs5gz9bchpxaw0xdhmsp5dv88lh25r2ss44kh8dxz"),("name","mo-lib"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9")])"#,
        r#"Derive([("out","","","")],[("/nix/store/kgl69vyd5yssfkn9a7jvb6s21zfah5ja-mx-ca1.drv",["out"]),("/nix/store/p1qxcx8sbmi2zvx8dk4944x7hnlh4fly-mx-ia-leaf.drv",["dev","out"])],["/nix/store/igp3ry331i6rq512l5i84f06s7mhvf65-mx-src.txt"],"x86_64-linux","/bin/sh",[],[("name","mx-ia-on-ca"),("out","")])"#,
    ];

    /// Strings heavy in the characters that need escaping, plus arbitrary Unicode.
    fn any_string() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                3 => any::<char>(),
                1 => prop::sample::select(vec!['"', '\\', '\n', '\r', '\t', '(', ')', '[', ']', ',']),
            ],
            0..12,
        )
        .prop_map(String::from_iter)
    }

    fn abs_path() -> impl Strategy<Value = String> {
        any_string().prop_map(|s| format!("/{s}"))
    }

    fn method_algo() -> impl Strategy<Value = (String, usize)> {
        (
            prop::sample::select(vec!["", "r:", "text:"]),
            prop::sample::select(vec![
                ("md5", 32),
                ("sha1", 40),
                ("sha256", 64),
                ("sha512", 128),
            ]),
        )
            .prop_map(|(m, (a, n))| (format!("{m}{a}"), n))
    }

    fn output() -> impl Strategy<Value = DerivationOutput> {
        prop_oneof![
            abs_path().prop_map(|path| DerivationOutput::InputAddressed { path }),
            (method_algo(), any::<u64>(), abs_path()).prop_map(|((method_algo, n), seed, path)| {
                let hash: String = (0..n)
                    .map(|i| b"0123456789abcdef"[((seed >> (i % 61)) as usize + i) % 16] as char)
                    .collect();
                DerivationOutput::CaFixed {
                    method_algo,
                    hash,
                    path,
                }
            }),
            method_algo().prop_map(|(method_algo, _)| DerivationOutput::CaFloating { method_algo }),
            Just(DerivationOutput::Deferred),
        ]
    }

    /// A dynamic input node, up to three levels deep.
    fn dynamic_node() -> impl Strategy<Value = DynamicNode> {
        let leaf =
            prop::collection::btree_set(any_string(), 0..3).prop_map(|outputs| DynamicNode {
                outputs,
                dynamic_outputs: BTreeMap::new(),
            });
        leaf.prop_recursive(3, 12, 3, |inner| {
            (
                prop::collection::btree_set(any_string(), 0..3),
                prop::collection::btree_map(any_string(), inner, 0..3),
            )
                .prop_map(|(outputs, dynamic_outputs)| DynamicNode {
                    outputs,
                    dynamic_outputs,
                })
        })
    }

    prop_compose! {
        fn derivation()(
            outputs in prop::collection::btree_map(any_string(), output(), 0..5),
            inputs in prop::collection::btree_map(
                abs_path(),
                (
                    prop::collection::btree_set(any_string(), 0..4),
                    prop::collection::btree_map(any_string(), dynamic_node(), 0..3),
                ),
                0..6,
            ),
            input_srcs in prop::collection::btree_set(abs_path(), 0..6),
            system in any_string(),
            builder in any_string(),
            args in prop::collection::vec(any_string(), 0..6),
            env in prop::collection::btree_map(any_string(), any_string(), 0..8),
        ) -> Derivation {
            let name = env.get("name").cloned().unwrap_or_default();
            let mut input_drvs = BTreeMap::new();
            let mut dynamic_inputs = BTreeMap::new();
            for (p, (outs, dynamic)) in inputs {
                if !dynamic.is_empty() {
                    dynamic_inputs.insert(p.clone(), dynamic);
                }
                input_drvs.insert(p, outs);
            }
            Derivation {
                name, outputs, input_drvs, dynamic_inputs, input_srcs, system, builder, args, env,
            }
        }
    }

    /// The parser never panics; any error lies within the input; anything it accepts prints back
    /// to the identical bytes.
    fn check_total(input: &[u8]) -> std::result::Result<(), TestCaseError> {
        match parse(input) {
            Ok(d) => {
                let printed = print(&d);
                prop_assert_eq!(printed.as_bytes(), input)
            }
            Err(e) => prop_assert!(
                e.offset <= input.len(),
                "offset {} > {}",
                e.offset,
                input.len()
            ),
        }
        Ok(())
    }

    fn seed_or_generated() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::sample::select(SEEDS).prop_map(|s| s.as_bytes().to_vec()),
            derivation().prop_map(|d| print(&d).into_bytes()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn print_parse_is_identity(d in derivation()) {
            let text = print(&d);
            let back = parse(text.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back, &d);
            prop_assert_eq!(print(&back), text);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            check_total(&bytes)?;
        }

        #[test]
        fn arbitrary_bytes_after_prefix_never_panic(
            prefix in prop::sample::select(vec!["", "Derive(", "Derive([", "Derive([(\"out\",\"", "Derive([],[],[],\"s\",\"b\",[],["]),
            bytes in prop::collection::vec(prop_oneof![any::<u8>(), prop::sample::select(b"()[],\"\\/".to_vec())], 0..128),
        ) {
            let mut input = prefix.as_bytes().to_vec();
            input.extend(bytes);
            check_total(&input)?;
        }

        #[test]
        fn truncations_are_errors(text in seed_or_generated(), cut in any::<prop::sample::Index>()) {
            let at = cut.index(text.len());
            let e = parse(&text[..at]);
            prop_assert!(e.is_err(), "a proper prefix parsed");
            prop_assert!(e.unwrap_err().offset <= at);
        }

        #[test]
        fn byte_flips_never_panic(
            text in seed_or_generated(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
        ) {
            let mut t = text;
            for (at, b, op) in edits {
                if t.is_empty() { break; }
                let i = at.index(t.len());
                match op {
                    0 => t[i] = b,
                    1 => t.insert(i, b),
                    _ => { t.remove(i); }
                }
            }
            check_total(&t)?;
        }
    }
}

#[cfg(test)]
mod tests_seed {
    pub const CHAIN_B: &str = r#"Derive([("out","","r:sha256","")],[("/nix/store/bb2hv5vpc898gbqnr314h9367m8ambvj-chain-a.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo /1382g89hyjxy1s6s14v4dfnvlf6fa133igny84dz8n2wzxqzswyf > $out; cat /1382g89hyjxy1s6s14v4dfnvlf6fa133igny84dz8n2wzxqzswyf >> $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("dep","/1382g89hyjxy1s6s14v4dfnvlf6fa133igny84dz8n2wzxqzswyf"),("name","chain-b"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#;
}
