//! The ATerm text of a `.drv`:
//! `Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])`.
//!
//! The parser accepts exactly the canonical form Nix writes, so that for every input it accepts,
//! printing the result gives back the identical bytes (and hence the same drv path):
//! - strings escape exactly `"` `\` newline CR tab (`\"` `\\` `\n` `\r` `\t`); any other escape,
//!   or a raw newline/CR/tab inside a string, is an error;
//! - outputs, input drvs (and each one's output names), input sources and env are strictly sorted
//!   (no duplicates);
//! - every output tuple is one of Nix's four shapes (input-addressed, fixed, floating, deferred),
//!   hash algorithms are known and fixed hashes are lower-case hex of the algorithm's length;
//! - paths are absolute; nothing may follow the closing `)`.
//!
//! The printer escapes every string the same way. (Nix prints output fields and input paths
//! without escaping; they never contain characters that need it, so the bytes are identical for
//! every real derivation, and ours stay parseable for arbitrary strings.)
//!
//! Parsing is a single linear pass with fixed nesting depth (no recursion), and every failure is a
//! [`ParseError`] carrying the byte offset and what was expected.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use thiserror::Error;

use super::derivation::{Derivation, DerivationOutput, is_valid_fixed_hash, split_method_algo};

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

    fn derivation(&mut self) -> Result<Derivation> {
        let mut drv = Derivation::default();
        self.expect_lit(b"Derive(", "'Derive('")?;

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
            let outs = p.sorted_strings("input derivation outputs", false)?;
            p.expect(b')', "')'")?;
            drv.input_drvs.insert(path, outs);
            Ok(())
        })?;
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
) {
    out.push_str("Derive([");
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
        write_list(out, outs.iter().map(String::as_str));
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
    write(&mut out, drv, false, &drv.input_drvs);
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
    write(&mut out, drv, mask, input_hashes);
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

    prop_compose! {
        fn derivation()(
            outputs in prop::collection::btree_map(any_string(), output(), 0..5),
            input_drvs in prop::collection::btree_map(
                abs_path(), prop::collection::btree_set(any_string(), 0..4), 0..6),
            input_srcs in prop::collection::btree_set(abs_path(), 0..6),
            system in any_string(),
            builder in any_string(),
            args in prop::collection::vec(any_string(), 0..6),
            env in prop::collection::btree_map(any_string(), any_string(), 0..8),
        ) -> Derivation {
            let name = env.get("name").cloned().unwrap_or_default();
            Derivation { name, outputs, input_drvs, input_srcs, system, builder, args, env }
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
