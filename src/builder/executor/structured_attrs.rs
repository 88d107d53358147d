//! Structured attributes (`__structuredAttrs = true`: the drv's env holds `__json`), as Nix 2.8's
//! local builder passes them:
//!
//! - the attributes are the `__json` object with `outputs` replaced by an object mapping each
//!   output name to its path (its hash placeholder, rewritten like the rest of the files);
//! - `.attrs.json` is that object as nlohmann's `dump()` prints it: compact, keys sorted by their
//!   bytes, strings escaped with `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t` and `\u00xx` for the
//!   other control characters, everything else (UTF-8 included) as is;
//! - `.attrs.sh` declares every attribute whose name is a shell variable name and whose value is
//!   a string (single-quoted, `'` as `'\''`), an integral number, null (`''`), a Boolean (`1` or
//!   empty), or an array or object of those (`declare -a`/`declare -A`); anything else (floats
//!   with a fraction, nested arrays or objects, other names) is left out. Numbers are printed as
//!   Nix 2.8 does: as a C `int` (so `4294967297` becomes `1`).

use serde_json::{Map, Number, Value};
use thiserror::Error;

/// Why the `__json` attribute cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StructuredAttrsError {
    #[error("cannot process __json attribute: {0}")]
    Parse(String),
    #[error("cannot process __json attribute: it is not a JSON object")]
    NotAnObject,
    #[error("attribute '{name}' must be a list of strings")]
    NotStrings { name: String },
}

/// Parses `__json` (it must be an object).
pub fn parse(json: &str) -> Result<Map<String, Value>, StructuredAttrsError> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(StructuredAttrsError::NotAnObject),
        Err(e) => Err(StructuredAttrsError::Parse(e.to_string())),
    }
}

/// `getStringsAttr(name)` on structured attributes: `None` if absent, else a list of strings.
pub fn strings_attr(
    attrs: &Map<String, Value>,
    name: &str,
) -> Result<Option<Vec<String>>, StructuredAttrsError> {
    let Some(v) = attrs.get(name) else {
        return Ok(None);
    };
    let not = || StructuredAttrsError::NotStrings {
        name: name.to_string(),
    };
    let list = v.as_array().ok_or_else(not)?;
    list.iter()
        .map(|x| x.as_str().map(str::to_string).ok_or_else(not))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The attributes the builder gets: `attrs` with `outputs` = {name: path} (`outputs` gives the
/// output names and what to write for each, e.g. their hash placeholders).
pub fn with_outputs<'a>(
    attrs: &Map<String, Value>,
    outputs: impl IntoIterator<Item = (&'a str, String)>,
) -> Map<String, Value> {
    let mut m = attrs.clone();
    let outs: Map<String, Value> = outputs
        .into_iter()
        .map(|(k, v)| (k.to_string(), Value::String(v)))
        .collect();
    m.insert("outputs".into(), Value::Object(outs));
    m
}

/// `.attrs.json`: the attributes as nlohmann's `dump()` prints them (see the module doc).
pub fn render_json(attrs: &Map<String, Value>) -> String {
    let mut s = String::new();
    write_object(attrs, &mut s);
    s
}

fn write_object(m: &Map<String, Value>, out: &mut String) {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    out.push('{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(k, out);
        out.push(':');
        write_value(&m[k], out);
    }
    out.push('}');
}

fn write_value(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => write_object(m, out),
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_number(n: &Number, out: &mut String) {
    if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(f) = n.as_f64() {
        out.push_str(&format_float(f));
    }
}

/// A double as nlohmann prints it: the shortest digits that read back, in fixed notation when
/// the decimal exponent is in (-4, 15] (always with a fraction, `3.0`), else `d.ddde+XX`.
fn format_float(f: f64) -> String {
    if !f.is_finite() {
        return "null".into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: `d[.ddd]e<exp>`.
    let e = format!("{:e}", f.abs());
    let (mantissa, exp) = e.split_once('e').unwrap_or((e.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let k = digits.len() as i32;
    // value = 0.d1d2…dk × 10^n
    let n = exp + 1;
    let mut s = String::new();
    if f.is_sign_negative() {
        s.push('-');
    }
    if k <= n && n <= 15 {
        s.push_str(&digits);
        s.push_str(&"0".repeat((n - k) as usize));
        s.push_str(".0");
    } else if 0 < n && n <= 15 {
        s.push_str(&digits[..n as usize]);
        s.push('.');
        s.push_str(&digits[n as usize..]);
    } else if -4 < n && n <= 0 {
        s.push_str("0.");
        s.push_str(&"0".repeat((-n) as usize));
        s.push_str(&digits);
    } else {
        s.push_str(&digits[..1]);
        if k > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let e = n - 1;
        s.push('e');
        s.push(if e < 0 { '-' } else { '+' });
        s.push_str(&format!("{:02}", e.abs()));
    }
    s
}

/// Nix's `shellEscape`: single quotes around, each `'` as `'\''`.
pub fn shell_escape(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A number as Nix 2.8 writes it to `.attrs.sh`: only if it is integral as a C `float`, then as
/// a C `int` (integers wrap; floats out of `int`'s range give `INT_MIN`, as on x86-64).
fn shell_number(n: &Number) -> Option<String> {
    let (as_float, as_int): (f32, i32) = if let Some(i) = n.as_i64() {
        (i as f32, i as i32)
    } else if let Some(u) = n.as_u64() {
        (u as f32, u as i32)
    } else {
        let f = n.as_f64()?;
        let t = f.trunc();
        let int = if t >= i32::MIN as f64 && t <= i32::MAX as f64 {
            t as i32
        } else {
            i32::MIN
        };
        (f as f32, int)
    };
    (as_float.ceil() == as_float).then(|| as_int.to_string())
}

fn shell_simple(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(shell_escape(s)),
        Value::Number(n) => shell_number(n),
        Value::Null => Some("''".into()),
        Value::Bool(b) => Some(if *b { "1" } else { "" }.into()),
        _ => None,
    }
}

fn is_shell_var_name(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// `.attrs.sh` (see the module doc).
pub fn render_shell(attrs: &Map<String, Value>) -> String {
    let mut keys: Vec<&String> = attrs.keys().collect();
    keys.sort();
    let mut sh = String::new();
    for key in keys {
        if !is_shell_var_name(key) {
            continue;
        }
        let value = &attrs[key];
        if let Some(s) = shell_simple(value) {
            sh.push_str(&format!("declare {key}={s}\n"));
        } else if let Value::Array(a) = value {
            let items: Option<Vec<String>> = a.iter().map(shell_simple).collect();
            if let Some(items) = items {
                let body: String = items.iter().map(|i| format!("{i} ")).collect();
                sh.push_str(&format!("declare -a {key}=({body})\n"));
            }
        } else if let Value::Object(m) = value {
            let mut inner: Vec<&String> = m.keys().collect();
            inner.sort();
            let items: Option<Vec<String>> = inner
                .iter()
                .map(|k| shell_simple(&m[*k]).map(|v| format!("[{}]={v} ", shell_escape(k))))
                .collect();
            if let Some(items) = items {
                sh.push_str(&format!("declare -A {key}=({})\n", items.concat()));
            }
        }
    }
    sh
}

#[cfg(test)]
mod tests {
    use super::*;

    // What Nix 2.8 wrote for this `__json` (nix-instantiate, then the build's `.attrs.json` and
    // `.attrs.sh`; output paths shortened).
    const JSON: &str = r#"{"PATH":"/usr/bin:/bin","bad-name":"x","big":4294967297,"builder":"/bin/bash","deep":{"a":{"b":1}},"f":false,"flt":1.5,"flt2":3,"int":42,"lst":["a","b'c",1,true],"map":{"k 2":"v'2","k1":"v1","k3":3},"n":null,"name":"sa","neg":-7,"nested":[["x"]],"outputs":["out","dev"],"str":"it's a \"string\" with $dollar and \\ backslash\nnewline","system":"x86_64-linux","t":true}"#;

    fn attrs() -> Map<String, Value> {
        with_outputs(
            &parse(JSON).unwrap(),
            [("out", "/s/o".to_string()), ("dev", "/s/d".to_string())],
        )
    }

    #[test]
    fn attrs_json_is_nlohmanns_dump_with_outputs_mapped() {
        assert_eq!(
            render_json(&attrs()),
            r#"{"PATH":"/usr/bin:/bin","bad-name":"x","big":4294967297,"builder":"/bin/bash","deep":{"a":{"b":1}},"f":false,"flt":1.5,"flt2":3,"int":42,"lst":["a","b'c",1,true],"map":{"k 2":"v'2","k1":"v1","k3":3},"n":null,"name":"sa","neg":-7,"nested":[["x"]],"outputs":{"dev":"/s/d","out":"/s/o"},"str":"it's a \"string\" with $dollar and \\ backslash\nnewline","system":"x86_64-linux","t":true}"#
        );
    }

    #[test]
    fn attrs_sh_quotes_as_nix_does() {
        assert_eq!(
            render_shell(&attrs()),
            "declare PATH='/usr/bin:/bin'\n\
             declare big=1\n\
             declare builder='/bin/bash'\n\
             declare f=\n\
             declare flt2=3\n\
             declare int=42\n\
             declare -a lst=('a' 'b'\\''c' 1 1 )\n\
             declare -A map=(['k 2']='v'\\''2' ['k1']='v1' ['k3']=3 )\n\
             declare n=''\n\
             declare name='sa'\n\
             declare neg=-7\n\
             declare -A outputs=(['dev']='/s/d' ['out']='/s/o' )\n\
             declare str='it'\\''s a \"string\" with $dollar and \\ backslash\nnewline'\n\
             declare system='x86_64-linux'\n\
             declare t=1\n"
        );
    }

    #[test]
    fn empty_lists_and_maps_are_declared_and_bad_members_drop_the_attribute() {
        let a = parse(
            r#"{"e":[],"m":{},"x":[1.5],"y":{"a":[1]},"_ok":null,"9no":"x","a-b":"x","lst":[null,false]}"#,
        )
        .unwrap();
        assert_eq!(
            render_shell(&a),
            "declare _ok=''\ndeclare -a e=()\ndeclare -a lst=(''  )\ndeclare -A m=()\n"
        );
    }

    #[test]
    fn numbers_as_nix_28_prints_them() {
        let n = |s: &str| shell_number(&serde_json::from_str::<Number>(s).unwrap());
        assert_eq!(n("0"), Some("0".into()));
        assert_eq!(n("-2147483648"), Some("-2147483648".into()));
        assert_eq!(n("2147483648"), Some("-2147483648".into()));
        assert_eq!(n("18446744073709551615"), Some("-1".into()));
        assert_eq!(n("3.0"), Some("3".into()));
        assert_eq!(n("-2.0"), Some("-2".into()));
        assert_eq!(n("1.5"), None);
        assert_eq!(n("1e20"), Some(i32::MIN.to_string()));
        // Integral as a float, not as a double.
        assert_eq!(n("1.00000001"), Some("1".into()));

        let f = |x: f64| format_float(x);
        assert_eq!(f(1.5), "1.5");
        assert_eq!(f(3.0), "3.0");
        assert_eq!(f(-0.25), "-0.25");
        assert_eq!(f(0.1), "0.1");
        assert_eq!(f(0.0001), "0.0001");
        assert_eq!(f(0.00001), "1e-05");
        assert_eq!(f(1e14), "100000000000000.0");
        assert_eq!(f(1e15), "1e+15");
        assert_eq!(f(1e100), "1e+100");
        assert_eq!(f(1e16), "1e+16");
        assert_eq!(f(1.25e20), "1.25e+20");
        assert_eq!(f(123.456), "123.456");
        assert_eq!(f(0.0), "0.0");
    }

    #[test]
    fn strings_escape_like_nlohmann() {
        let mut s = String::new();
        write_string("a\u{1}\u{1f}\u{7f}é\t\"\\/", &mut s);
        assert_eq!(s, "\"a\\u0001\\u001f\u{7f}é\\t\\\"\\\\/\"");
    }

    #[test]
    fn bad_json_and_string_lists() {
        assert!(matches!(parse("{"), Err(StructuredAttrsError::Parse(_))));
        assert_eq!(parse("[1]"), Err(StructuredAttrsError::NotAnObject));
        let a = parse(r#"{"l":["a","b"],"bad":["a",1],"s":"x"}"#).unwrap();
        assert_eq!(
            strings_attr(&a, "l").unwrap(),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(strings_attr(&a, "none").unwrap(), None);
        for k in ["bad", "s"] {
            assert_eq!(
                strings_attr(&a, k),
                Err(StructuredAttrsError::NotStrings { name: k.into() })
            );
        }
    }
}
