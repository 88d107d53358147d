//! Fuzzing the two parsers that read bytes from outside: the ATerm derivation parser (drvs read
//! from the store, from `qr import`, from builders' jobs) and the NAR reader (uploads from
//! builders, NARs fetched from the runner). Structure-aware: the inputs are mutations of valid
//! documents (the Nix oracle fixtures' drvs, NARs of random trees) at the byte level and at the
//! level of their tokens (splices from other documents, duplicated, dropped and swapped tokens,
//! lengths that lie, huge strings, deep nesting), so most cases get deep into the parsers.
//!
//! What each case proves:
//! - no panic (a panic fails the test; debug builds also trap integer overflow);
//! - bounded memory: a counting global allocator measures the peak bytes held by the parse on its
//!   thread, which must stay linear in the input (a declared length is never allocated);
//! - clear errors: every failure is a typed error whose message names the byte offset, which lies
//!   within the input, and what was expected; a truncated document reports the end of input at
//!   exactly the cut;
//! - anything accepted is canonical (printing it back gives the identical bytes), and the NAR
//!   reader's result does not depend on how the input is split into reads;
//! - deep nesting does not overflow a 2 MiB stack (a tokio blocking thread's size).
//!
//! Case counts: CI defaults, scaled by `QR_FUZZ_CASES` (see `docs/fuzzing.md`).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{self, Read};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as PtConfig, TestCaseError};
use qr::store::aterm::{self, ParseError, ParseErrorKind};
use qr::store::derivation::Derivation;
use qr::store::hash_modulo::DrvHashes;
use qr::store::nar::{
    NarError, NarErrorKind, NarEvent, NarLimits, NarReader, NarTree, RestoreError, dump_path,
    restore,
};
use qr::store::{StoreDir, StorePath};

use common::fuzz::{Rng, cases, seed};

// --- a counting allocator: peak bytes held per thread -------------------------------------------

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn count_alloc(n: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get().saturating_add(n);
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn count_free(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
}

// SAFETY: every call is forwarded to the system allocator unchanged; the bookkeeping only touches
// const-initialised thread locals without destructors (no allocation, no reentrancy).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count_free(layout.size());
            count_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`; returns its result and the most bytes it held at once (on this thread) beyond what
/// was live before.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, peak.saturating_sub(base))
}

#[test]
fn the_counting_allocator_sees_allocations() {
    let (v, peak) = peak_alloc(|| vec![0u8; 3 << 20]);
    assert!(peak >= 3 << 20, "{peak}");
    drop(v);
    let (_, peak) = peak_alloc(|| 1 + 1);
    assert_eq!(peak, 0);
}

/// Runs `f` on a thread with a 2 MiB stack (what tokio gives its blocking threads and the test
/// harness its test threads), so stack use does not depend on `RUST_MIN_STACK`.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .expect("spawn")
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn show(input: &[u8]) -> String {
    let s = String::from_utf8_lossy(&input[..input.len().min(400)]).into_owned();
    if input.len() > 400 {
        format!("{s:?}… ({} bytes)", input.len())
    } else {
        format!("{s:?}")
    }
}

fn pt_config(ci_cases: u32) -> PtConfig {
    PtConfig {
        cases: cases(ci_cases),
        // Failing cases are saved here and replayed first on the next run.
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "tests/proptest-regressions/fuzz_parsers.txt",
            ),
        )),
        // Shrinking a mutation list is quick; keep it bounded anyway.
        max_shrink_iters: 2000,
        ..PtConfig::default()
    }
}

// --- ATerm ---------------------------------------------------------------------------------------

/// Every drv's ATerm in the fixtures, and the resolved drvs Nix wrote, deduplicated.
fn aterm_seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut all = std::collections::BTreeSet::new();
        for (_, fx) in common::load_fixtures() {
            for (_, d) in common::derivations(&fx) {
                all.insert(common::s(d, "/aterm").as_bytes().to_vec());
                if let Some(r) = d.get("resolved").and_then(|r| r.get("aterm")) {
                    all.insert(r.as_str().expect("resolved aterm").as_bytes().to_vec());
                }
            }
        }
        assert!(
            all.len() >= 20,
            "expected the fixtures' drvs, got {}",
            all.len()
        );
        all.into_iter().collect()
    })
}

/// The fixture drvs by path (to load the inputs of mutated drvs when hashing them).
fn fixture_drvs() -> &'static BTreeMap<String, Derivation> {
    static DRVS: std::sync::OnceLock<BTreeMap<String, Derivation>> = std::sync::OnceLock::new();
    DRVS.get_or_init(|| {
        let sd = StoreDir::default();
        let mut m = BTreeMap::new();
        for (_, fx) in common::load_fixtures() {
            for (p, d) in common::derivations(&fx) {
                let name = sd
                    .parse(p)
                    .expect("fixture drv path")
                    .drv_name()
                    .to_string();
                let drv = aterm::parse_named(common::s(d, "/aterm").as_bytes(), &name)
                    .expect("fixture parses");
                m.insert(p.to_string(), drv);
            }
        }
        m
    })
}

/// Spans of the ATerm's tokens: quoted strings (escapes included), words, single punctuation.
fn aterm_tokens(s: &[u8]) -> Vec<(usize, usize)> {
    let mut toks = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let start = i;
        if s[i] == b'"' {
            i += 1;
            while i < s.len() && s[i] != b'"' {
                i += if s[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(s.len());
        } else if s[i].is_ascii_alphabetic() {
            while i < s.len() && s[i].is_ascii_alphabetic() {
                i += 1;
            }
        } else {
            i += 1;
        }
        toks.push((start, i));
    }
    toks
}

/// What replaces a string token.
#[derive(Debug, Clone)]
enum Filler {
    /// `n` KiB of one character (escaped if needed).
    Huge(u16, u8),
    /// A very long run of digits (a "number" no field should try to convert).
    Digits(u16),
    Empty,
    Slash,
    /// Raw bytes, not necessarily UTF-8, not escaped.
    Raw(Vec<u8>),
    /// Many escapes, valid and not.
    Escapes(u16, bool),
    Unicode,
}

impl Filler {
    fn bytes(&self) -> Vec<u8> {
        let quoted = |body: &[u8]| {
            let mut v = vec![b'"'];
            v.extend_from_slice(body);
            v.push(b'"');
            v
        };
        match self {
            Filler::Huge(kib, c) => {
                let unit: &[u8] = match c % 4 {
                    0 => b"a",
                    1 => b"\\\"",
                    2 => "é".as_bytes(),
                    _ => b"/",
                };
                quoted(&unit.repeat(*kib as usize * 1024 / unit.len()))
            }
            Filler::Digits(n) => quoted(&b"9".repeat(*n as usize * 16)),
            Filler::Empty => quoted(b""),
            Filler::Slash => quoted(b"/"),
            Filler::Raw(b) => quoted(b),
            Filler::Escapes(n, valid) => {
                let unit: &[u8] = if *valid { b"\\n\\t\\\\" } else { b"\\x\\u00" };
                quoted(&unit.repeat(*n as usize))
            }
            Filler::Unicode => quoted("\u{0}\u{7f}€😀\u{feff}".as_bytes()),
        }
    }
}

fn filler() -> impl Strategy<Value = Filler> {
    prop_oneof![
        1 => (1u16..512, any::<u8>()).prop_map(|(k, c)| Filler::Huge(k, c)),
        1 => (1u16..4096).prop_map(Filler::Digits),
        2 => Just(Filler::Empty),
        2 => Just(Filler::Slash),
        2 => prop::collection::vec(any::<u8>(), 0..24).prop_map(Filler::Raw),
        1 => (1u16..2000, any::<bool>()).prop_map(|(n, v)| Filler::Escapes(n, v)),
        1 => Just(Filler::Unicode),
    ]
}

/// One structure-aware edit of an ATerm.
#[derive(Debug, Clone)]
enum AtermOp {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, u8),
    Truncate(Index),
    /// Copy a slice of another seed here (inserting, or overwriting).
    Splice {
        from: Index,
        src: Index,
        len: u16,
        at: Index,
        overwrite: bool,
    },
    /// Repeat `n` tokens from a token (duplicate list items, doubled punctuation).
    DupTokens(Index, u8),
    DropTokens(Index, u8),
    SwapTokens(Index, Index),
    ReplaceString(Index, Filler),
    /// Open brackets, parentheses or quotes `depth` times at a token boundary.
    Nest(Index, u8, u32),
}

fn aterm_op() -> impl Strategy<Value = AtermOp> {
    let i = || any::<Index>();
    prop_oneof![
        3 => (i(), any::<u8>()).prop_map(|(a, b)| AtermOp::Flip(a, b)),
        2 => (i(), prop::collection::vec(prop::sample::select(b"()[],\"\\/x\n\0\xff".to_vec()), 1..8))
            .prop_map(|(a, b)| AtermOp::Insert(a, b)),
        2 => (i(), any::<u8>()).prop_map(|(a, n)| AtermOp::Delete(a, n)),
        1 => i().prop_map(AtermOp::Truncate),
        2 => (i(), i(), 1u16..600, i(), any::<bool>()).prop_map(|(from, src, len, at, overwrite)| {
            AtermOp::Splice { from, src, len, at, overwrite }
        }),
        2 => (i(), 1u8..12).prop_map(|(a, n)| AtermOp::DupTokens(a, n)),
        2 => (i(), 1u8..12).prop_map(|(a, n)| AtermOp::DropTokens(a, n)),
        2 => (i(), i()).prop_map(|(a, b)| AtermOp::SwapTokens(a, b)),
        3 => (i(), filler()).prop_map(|(a, f)| AtermOp::ReplaceString(a, f)),
        1 => (i(), any::<u8>(), prop_oneof![1u32..64, 1000u32..200_000])
            .prop_map(|(a, k, d)| AtermOp::Nest(a, k, d)),
    ]
}

fn apply_aterm_op(t: &mut Vec<u8>, op: &AtermOp) {
    let seeds = aterm_seeds();
    let toks = aterm_tokens(t);
    let tok = |ix: &Index| (!toks.is_empty()).then(|| toks[ix.index(toks.len())]);
    match op {
        AtermOp::Flip(at, b) if !t.is_empty() => {
            let i = at.index(t.len());
            t[i] = *b;
        }
        AtermOp::Insert(at, bytes) => {
            let i = at.index(t.len() + 1);
            t.splice(i..i, bytes.iter().copied());
        }
        AtermOp::Delete(at, n) if !t.is_empty() => {
            let i = at.index(t.len());
            let end = (i + *n as usize + 1).min(t.len());
            t.drain(i..end);
        }
        AtermOp::Truncate(at) => {
            let i = at.index(t.len() + 1);
            t.truncate(i);
        }
        AtermOp::Splice {
            from,
            src,
            len,
            at,
            overwrite,
        } => {
            let other = &seeds[from.index(seeds.len())];
            let s = src.index(other.len());
            let piece = &other[s..(s + *len as usize).min(other.len())];
            let i = at.index(t.len() + 1);
            if *overwrite {
                let end = (i + piece.len()).min(t.len());
                t.splice(i..end, piece.iter().copied());
            } else {
                t.splice(i..i, piece.iter().copied());
            }
        }
        AtermOp::DupTokens(at, n) => {
            if let Some(first) = tok(at) {
                let k = toks.iter().position(|x| *x == first).unwrap_or(0);
                let last = toks[(k + *n as usize - 1).min(toks.len() - 1)];
                let piece = t[first.0..last.1].to_vec();
                t.splice(last.1..last.1, piece);
            }
        }
        AtermOp::DropTokens(at, n) => {
            if let Some(first) = tok(at) {
                let k = toks.iter().position(|x| *x == first).unwrap_or(0);
                let last = toks[(k + *n as usize - 1).min(toks.len() - 1)];
                t.drain(first.0..last.1);
            }
        }
        AtermOp::SwapTokens(a, b) => {
            if let (Some(x), Some(y)) = (tok(a), tok(b)) {
                let (x, y) = if x.0 <= y.0 { (x, y) } else { (y, x) };
                if x != y {
                    let (xs, ys) = (t[x.0..x.1].to_vec(), t[y.0..y.1].to_vec());
                    t.splice(y.0..y.1, xs);
                    t.splice(x.0..x.1, ys);
                }
            }
        }
        AtermOp::ReplaceString(at, f) => {
            // The string token at or after `at` (any token if there is none).
            let strings: Vec<(usize, usize)> = toks
                .iter()
                .copied()
                .filter(|(s, _)| t.get(*s) == Some(&b'"'))
                .collect();
            let target = if strings.is_empty() {
                tok(at)
            } else {
                Some(strings[at.index(strings.len())])
            };
            if let Some((s, e)) = target {
                t.splice(s..e, f.bytes());
            }
        }
        AtermOp::Nest(at, kind, depth) => {
            let i = tok(at).map_or(0, |x| x.0);
            let unit = match kind % 4 {
                0 => &b"["[..],
                1 => b"(",
                2 => b"[(",
                _ => b"\"",
            };
            let piece = unit.repeat(*depth as usize);
            t.splice(i..i, piece);
        }
        _ => {}
    }
}

/// The checks every ATerm input must pass; `Ok(true)` when the parser accepted it.
fn check_aterm(input: &[u8]) -> Result<bool, TestCaseError> {
    let (res, peak) = peak_alloc(|| aterm::parse(input));
    let bound = 32 * input.len() + (64 << 10);
    prop_assert!(
        peak <= bound,
        "parsing {} bytes held {peak} bytes at once (bound {bound}): {}",
        input.len(),
        show(input)
    );
    match res {
        Ok(drv) => {
            let printed = aterm::print(&drv);
            prop_assert!(
                printed.as_bytes() == input,
                "accepted a non-canonical ATerm: {} printed back as {}",
                show(input),
                show(printed.as_bytes())
            );
            check_accepted_drv(&drv)?;
            Ok(true)
        }
        Err(e) => {
            check_aterm_error(&e, input)?;
            Ok(false)
        }
    }
}

/// An ATerm error names a byte offset within the input and what was wrong there.
fn check_aterm_error(e: &ParseError, input: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(
        e.offset <= input.len(),
        "error offset {} beyond the input ({} bytes): {e}",
        e.offset,
        input.len()
    );
    let msg = e.to_string();
    let kind = e.kind.to_string();
    prop_assert!(!kind.is_empty());
    prop_assert_eq!(msg, format!("{kind} at byte {}", e.offset));
    match &e.kind {
        ParseErrorKind::Expected(what) | ParseErrorKind::UnexpectedEof(what) => {
            prop_assert!(!what.is_empty() && kind.contains(what));
        }
        ParseErrorKind::NotSorted(what)
        | ParseErrorKind::NotAbsolute(what)
        | ParseErrorKind::BadOutput(what) => prop_assert!(!what.is_empty()),
        _ => {}
    }
    if matches!(e.kind, ParseErrorKind::UnexpectedEof(_)) {
        // The end of input is reported where the input ends.
        prop_assert_eq!(e.offset, input.len(), "{}", e);
    }
    Ok(())
}

/// What the runner does with a derivation it read must not panic either, and every store path
/// it computes must be a valid one.
fn check_accepted_drv(drv: &Derivation) -> Result<(), TestCaseError> {
    let sd = StoreDir::default();
    let reparse = |p: &StorePath, what: &str| -> Result<(), TestCaseError> {
        let full = sd.print(p);
        prop_assert!(
            sd.parse(&full).is_ok(),
            "{what} of drv {:?} is not a valid store path: {full:?}",
            drv.name
        );
        Ok(())
    };
    let _ = drv.drv_type();
    let _ = drv.needs_resolution();
    let _ = drv.static_output_paths();
    match drv.drv_path(&sd) {
        Ok(p) => reparse(&p, "drv path")?,
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    let json = drv.to_show_json();
    if let Err(e) = Derivation::from_show_json(&json, Some(&drv.name), &sd) {
        prop_assert!(!e.to_string().is_empty());
    }
    let known = fixture_drvs();
    let mut load = |p: &str| known.get(p).cloned().ok_or_else(|| format!("unknown {p}"));
    let mut hashes = DrvHashes::new(sd.clone());
    match hashes.output_paths(drv, &mut load) {
        Ok(paths) => {
            for p in paths.values().flatten() {
                reparse(p, "an output path")?;
            }
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    let resolved = qr::store::resolve::try_resolve(drv, &sd, |input, out| {
        known
            .get(input)
            .and_then(|d| d.outputs.get(out))
            .and_then(|o| o.path())
            .map(str::to_string)
    });
    match resolved {
        Ok(r) => {
            let text = r.to_aterm();
            let back = aterm::parse(text.as_bytes()).ok();
            prop_assert_eq!(back.as_ref(), Some(&r));
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

#[test]
fn every_fixture_drv_parses_and_every_truncation_is_an_end_of_input_error() {
    // Exhaustive, not random: every proper prefix of every fixture drv.
    let mut prefixes = 0;
    for seed in aterm_seeds() {
        assert!(check_aterm(seed).unwrap(), "{}", show(seed));
        for cut in 0..seed.len() {
            let e = aterm::parse(&seed[..cut]).expect_err("a proper prefix parsed");
            assert!(
                matches!(e.kind, ParseErrorKind::UnexpectedEof(_)) && e.offset == cut,
                "cut at {cut}: {e}"
            );
            assert!(e.to_string().contains("unexpected end of input"), "{e}");
            prefixes += 1;
        }
    }
    eprintln!(
        "{} fixture drvs, {prefixes} truncations",
        aterm_seeds().len()
    );
}

proptest! {
    #![proptest_config(pt_config(common::fuzz::REFERENCE_CASES as u32))]

    /// The reference target: fixture drvs under 1–6 structure-aware edits.
    #[test]
    fn mutated_fixture_drvs(
        seed in any::<Index>(),
        ops in prop::collection::vec(aterm_op(), 1..6),
    ) {
        let seeds = aterm_seeds();
        let mut t = seeds[seed.index(seeds.len())].clone();
        for op in &ops {
            apply_aterm_op(&mut t, op);
        }
        check_aterm(&t)?;
    }
}

proptest! {
    #![proptest_config(pt_config(1000))]

    /// Edits that keep the document well-formed token-wise but break its meaning: the parser
    /// must still say precisely what is wrong (sorting, paths, output shapes).
    #[test]
    fn semantically_broken_fixture_drvs(
        seed in any::<Index>(),
        which in any::<Index>(),
        edit in 0u8..6,
    ) {
        let seeds = aterm_seeds();
        let src = &seeds[seed.index(seeds.len())];
        let text = String::from_utf8(src.clone()).unwrap();
        let strings: Vec<(usize, usize)> = aterm_tokens(src)
            .into_iter()
            .filter(|(s, _)| src[*s] == b'"')
            .collect();
        let (s, e) = strings[which.index(strings.len())];
        let mut t = src.clone();
        match edit {
            // A path made relative.
            0 if src.get(s + 1) == Some(&b'/') => { t.remove(s + 1); }
            // A string made to sort before everything.
            1 => { t.splice(s + 1..e - 1, b"!".iter().copied()); }
            // A string made to sort after everything.
            2 => { t.splice(s + 1..s + 1, b"~~~~".iter().copied()); }
            // A hash algorithm or hash replaced by nonsense.
            3 => { t.splice(s..e, b"\"r:sha257\"".iter().copied()); }
            // An upper-case hash.
            4 => { let up = text[s..e].to_ascii_uppercase(); t.splice(s..e, up.into_bytes()); }
            _ => { t.splice(s..e, b"\"\"".iter().copied()); }
        }
        check_aterm(&t)?;
    }
}

#[test]
fn huge_strings_and_deep_nesting_are_linear_and_do_not_recurse() {
    let seed = aterm_seeds()
        .iter()
        .find(|s| s.windows(9).any(|w| w == b"\"/bin/sh\""))
        .expect("a drv with builder /bin/sh")
        .clone();
    let text = String::from_utf8(seed).unwrap();
    // A 32 MiB builder string, all escapes: accepted, held about once (plus growth slack).
    let big = format!("\"{}\"", "\\\"".repeat(16 << 20));
    let doc = text.replacen("\"/bin/sh\"", &big, 1);
    let (res, peak) = peak_alloc(|| aterm::parse(doc.as_bytes()));
    let drv = res.expect("a huge builder string is still a derivation");
    assert_eq!(drv.builder.len(), 16 << 20);
    assert!(peak <= 3 * doc.len(), "peak {peak} for {} bytes", doc.len());
    // A million open brackets where the outputs list goes: one error at its second byte, no
    // recursion, no memory.
    let mut deep = b"Derive(".to_vec();
    deep.extend(std::iter::repeat_n(b'[', 1 << 20));
    let (res, peak) = peak_alloc(|| on_small_stack(move || aterm::parse(&deep)));
    let e = res.unwrap_err();
    assert_eq!(e.offset, 8, "{e}");
    assert_eq!(e.to_string(), "expected '(' at byte 8");
    assert!(peak < 8 << 20, "{peak}");
    // An unterminated string of 64 MiB: the end of input, at the end.
    let mut open = b"Derive([(\"".to_vec();
    open.extend(std::iter::repeat_n(b'x', 64 << 20));
    let n = open.len();
    let e = aterm::parse(&open).unwrap_err();
    assert_eq!(
        (e.offset, e.to_string().contains("end of input")),
        (n, true)
    );
}

// --- NAR -----------------------------------------------------------------------------------------

fn nar_str(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
    out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
}

/// A NAR is a sequence of length-prefixed, zero-padded strings (file contents included): the
/// spans `(length field, data start, data end, padded end)` of a valid one.
fn nar_tokens(nar: &[u8]) -> Vec<(usize, usize, usize, usize)> {
    let mut toks = Vec::new();
    let mut i = 0;
    while i + 8 <= nar.len() {
        let len = u64::from_le_bytes(nar[i..i + 8].try_into().unwrap());
        let data = i + 8;
        let Some(padded) = len
            .checked_add(7)
            .map(|l| l / 8 * 8)
            .and_then(|l| usize::try_from(l).ok())
            .and_then(|l| data.checked_add(l))
            .filter(|p| *p <= nar.len())
        else {
            break;
        };
        let end = data + len as usize;
        toks.push((i, data, end, padded));
        i = padded;
    }
    toks
}

const NAR_WORDS: &[&[u8]] = &[
    b"nix-archive-1",
    b"(",
    b")",
    b"type",
    b"regular",
    b"executable",
    b"",
    b"contents",
    b"symlink",
    b"target",
    b"directory",
    b"entry",
    b"name",
    b"node",
    b".",
    b"..",
    b"a/b",
    b"\0",
];

#[derive(Debug, Clone, Copy)]
enum LenLie {
    Max,
    Huge(u8),
    PlusOne,
    MinusOne,
    PlusEight,
    Zero,
}

#[derive(Debug, Clone)]
enum NarOp {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Delete(Index, u8),
    /// A token's length field says something else.
    Len(Index, LenLie),
    /// A token's data replaced by a NAR keyword (or a bad name).
    Word(Index, Index),
    DupTokens(Index, u8),
    DropTokens(Index, u8),
    SwapTokens(Index, Index),
    /// A non-zero padding byte.
    Padding(Index, u8),
    /// Tokens from another NAR spliced in at a token boundary.
    Splice(Index, u8, Index),
    /// `depth` directories opened at a token boundary.
    Nest(Index, u16),
}

fn nar_op() -> impl Strategy<Value = NarOp> {
    let i = || any::<Index>();
    let lie = prop_oneof![
        Just(LenLie::Max),
        (32u8..63).prop_map(LenLie::Huge),
        Just(LenLie::PlusOne),
        Just(LenLie::MinusOne),
        Just(LenLie::PlusEight),
        Just(LenLie::Zero),
    ];
    prop_oneof![
        3 => (i(), any::<u8>()).prop_map(|(a, b)| NarOp::Flip(a, b)),
        1 => i().prop_map(NarOp::Truncate),
        1 => (i(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(a, b)| NarOp::Insert(a, b)),
        1 => (i(), any::<u8>()).prop_map(|(a, n)| NarOp::Delete(a, n)),
        3 => (i(), lie).prop_map(|(a, l)| NarOp::Len(a, l)),
        3 => (i(), i()).prop_map(|(a, w)| NarOp::Word(a, w)),
        2 => (i(), 1u8..10).prop_map(|(a, n)| NarOp::DupTokens(a, n)),
        2 => (i(), 1u8..10).prop_map(|(a, n)| NarOp::DropTokens(a, n)),
        2 => (i(), i()).prop_map(|(a, b)| NarOp::SwapTokens(a, b)),
        1 => (i(), 1u8..=255).prop_map(|(a, b)| NarOp::Padding(a, b)),
        2 => (i(), 1u8..20, i()).prop_map(|(a, n, at)| NarOp::Splice(a, n, at)),
        1 => (i(), prop_oneof![1u16..40, 1000u16..1100]).prop_map(|(a, d)| NarOp::Nest(a, d)),
    ]
}

fn apply_nar_op(t: &mut Vec<u8>, op: &NarOp, donor: &[u8]) {
    let toks = nar_tokens(t);
    let tok =
        |ix: &Index| (!toks.is_empty()).then(|| (ix.index(toks.len()), toks[ix.index(toks.len())]));
    match op {
        NarOp::Flip(at, b) if !t.is_empty() => {
            let i = at.index(t.len());
            t[i] ^= b | 1;
        }
        NarOp::Truncate(at) => {
            let i = at.index(t.len() + 1);
            t.truncate(i);
        }
        NarOp::Insert(at, b) => {
            let i = at.index(t.len() + 1);
            t.splice(i..i, b.iter().copied());
        }
        NarOp::Delete(at, n) if !t.is_empty() => {
            let i = at.index(t.len());
            let end = (i + *n as usize + 1).min(t.len());
            t.drain(i..end);
        }
        NarOp::Len(at, lie) => {
            if let Some((_, (l, d, e, _))) = tok(at) {
                let len = (e - d) as u64;
                let v = match lie {
                    LenLie::Max => u64::MAX,
                    LenLie::Huge(bits) => 1u64 << bits,
                    LenLie::PlusOne => len + 1,
                    LenLie::MinusOne => len.wrapping_sub(1),
                    LenLie::PlusEight => len + 8,
                    LenLie::Zero => 0,
                };
                t[l..l + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        NarOp::Word(at, w) => {
            if let Some((_, (l, _, _, p))) = tok(at) {
                let mut s = Vec::new();
                nar_str(&mut s, NAR_WORDS[w.index(NAR_WORDS.len())]);
                t.splice(l..p, s);
            }
        }
        NarOp::DupTokens(at, n) => {
            if let Some((k, (l, ..))) = tok(at) {
                let last = toks[(k + *n as usize - 1).min(toks.len() - 1)].3;
                let piece = t[l..last].to_vec();
                t.splice(last..last, piece);
            }
        }
        NarOp::DropTokens(at, n) => {
            if let Some((k, (l, ..))) = tok(at) {
                let last = toks[(k + *n as usize - 1).min(toks.len() - 1)].3;
                t.drain(l..last);
            }
        }
        NarOp::SwapTokens(a, b) => {
            if let (Some((_, x)), Some((_, y))) = (tok(a), tok(b)) {
                let (x, y) = if x.0 <= y.0 { (x, y) } else { (y, x) };
                if x != y {
                    let (xs, ys) = (t[x.0..x.3].to_vec(), t[y.0..y.3].to_vec());
                    t.splice(y.0..y.3, xs);
                    t.splice(x.0..x.3, ys);
                }
            }
        }
        NarOp::Padding(at, b) => {
            // The first token from `at` on that has padding.
            if let Some((k, _)) = tok(at) {
                if let Some(&(_, _, e, p)) = toks[k..].iter().find(|x| x.3 > x.2) {
                    t[e + (p - e) / 2] = *b;
                }
            }
        }
        NarOp::Splice(from, n, at) => {
            let dt = nar_tokens(donor);
            if !dt.is_empty() {
                let k = from.index(dt.len());
                let last = dt[(k + *n as usize - 1).min(dt.len() - 1)].3;
                let piece = donor[dt[k].0..last].to_vec();
                let i = tok(at).map_or(t.len(), |(_, x)| x.0);
                t.splice(i..i, piece);
            }
        }
        NarOp::Nest(at, depth) => {
            let mut piece = Vec::new();
            for _ in 0..*depth {
                for w in [
                    &b"entry"[..],
                    b"(",
                    b"name",
                    b"d",
                    b"node",
                    b"(",
                    b"type",
                    b"directory",
                ] {
                    nar_str(&mut piece, w);
                }
            }
            let i = tok(at).map_or(t.len(), |(_, x)| x.0);
            t.splice(i..i, piece);
        }
        _ => {}
    }
}

/// A reader that hands out the input in pieces of 1..=`max` bytes, sometimes failing with
/// `Interrupted` first (which must be retried), to check that the result does not depend on
/// how the input arrives.
struct Dribble<'a> {
    data: &'a [u8],
    rng: Rng,
    max: usize,
}

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rng.chance(0.05) {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        let n = buf
            .len()
            .min(self.data.len())
            .min(1 + self.rng.below(self.max));
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Everything the pull parser reports, with file contents read in small pieces; the error as
/// its message.
fn nar_events(r: impl Read) -> Result<(Vec<NarEvent>, Vec<u8>, u64), String> {
    let mut nar = NarReader::new(r);
    let mut events = Vec::new();
    let mut contents = Vec::new();
    let mut buf = [0u8; 7];
    while let Some(ev) = nar.next_event().map_err(|e| e.to_string())? {
        if matches!(ev, NarEvent::Regular { .. }) {
            loop {
                let n = nar.read_contents(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                contents.extend_from_slice(&buf[..n]);
            }
        }
        events.push(ev);
    }
    nar.expect_eof().map_err(|e| e.to_string())?;
    Ok((events, contents, nar.offset()))
}

fn check_nar_error(e: &NarError, input: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(
        e.offset <= input.len() as u64,
        "error offset {} beyond the input ({} bytes): {e}",
        e.offset,
        input.len()
    );
    let msg = e.to_string();
    let kind = e.kind.to_string();
    prop_assert!(!kind.is_empty());
    prop_assert_eq!(&msg, &format!("invalid NAR at byte {}: {kind}", e.offset));
    match &e.kind {
        NarErrorKind::UnexpectedEof => prop_assert_eq!(e.offset, input.len() as u64),
        NarErrorKind::UnexpectedToken { expected, found } => {
            prop_assert!(
                !expected.is_empty() && msg.contains(expected) && msg.contains(found.as_str())
            );
        }
        NarErrorKind::TooLong { len, limit, .. } => prop_assert!(len > limit),
        NarErrorKind::Io(_) | NarErrorKind::Poisoned => {
            prop_assert!(false, "an in-memory input gave {msg}")
        }
        _ => {}
    }
    Ok(())
}

/// The checks every NAR input must pass; `Ok(true)` when the reader accepted it.
fn check_nar(input: &[u8], rng_seed: u64, restore_too: bool) -> Result<bool, TestCaseError> {
    // In memory, with the whole input available.
    let ((res, consumed), peak) = peak_alloc(|| {
        let mut r = input;
        let mut nar = NarReader::new(&mut r);
        let t = NarTree::from_reader(&mut nar, u64::MAX).and_then(|t| nar.expect_eof().map(|()| t));
        (t, nar.offset())
    });
    // The 64 KiB copy buffer, the tree (at most the input, plus growth slack and map nodes), and
    // the current path.
    let bound = 8 * input.len() + (512 << 10);
    prop_assert!(
        peak <= bound,
        "reading a NAR of {} bytes held {peak} bytes at once (bound {bound})",
        input.len()
    );
    // The same through the pull parser, in dribbles.
    let dribble = Dribble {
        data: input,
        rng: Rng::new(rng_seed),
        max: 1 + (rng_seed % 64) as usize,
    };
    let streamed = nar_events(dribble);
    match &res {
        Ok(tree) => {
            prop_assert_eq!(consumed as usize, input.len());
            let again = tree
                .to_nar()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(
                again == input,
                "accepted a non-canonical NAR: {}",
                show(input)
            );
            prop_assert!(
                streamed.is_ok(),
                "in memory OK, streamed: {:?}",
                streamed.err()
            );
        }
        Err(e) => {
            check_nar_error(e, input)?;
            prop_assert_eq!(streamed.err(), Some(e.to_string()), "streamed differently");
        }
    }
    if restore_too {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("r");
        let mut r = input;
        let mut nar = NarReader::new(&mut r);
        let restored =
            restore(&mut nar, &dest).and_then(|()| nar.expect_eof().map_err(RestoreError::from));
        match (&res, restored) {
            (Ok(_), Ok(())) => {
                let mut again = Vec::new();
                dump_path(&dest, &mut again).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(again == input, "restored tree dumps differently");
            }
            (Err(e), Err(RestoreError::Nar(r))) => prop_assert_eq!(e.to_string(), r.to_string()),
            (a, b) => prop_assert!(
                false,
                "in memory: {:?}, restored: {:?}",
                a.as_ref().err(),
                b.err()
            ),
        }
    }
    Ok(res.is_ok())
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-zA-Z0-9._-]{1,12}".prop_map(String::into_bytes),
        1 => prop::collection::vec(1u8..=255, 1..8),
        1 => prop::collection::vec(prop::sample::select(b"a.-".to_vec()), 200..255),
    ]
    .prop_filter("valid entry name", |n| {
        qr::store::nar::validate_entry_name(n).is_ok()
    })
}

fn arb_tree() -> impl Strategy<Value = NarTree> {
    let leaf = prop_oneof![
        (
            any::<bool>(),
            prop_oneof![
                4 => prop::collection::vec(any::<u8>(), 0..64),
                1 => prop::collection::vec(any::<u8>(), 0..70_000),
            ]
        )
            .prop_map(|(executable, contents)| NarTree::Regular {
                executable,
                contents
            }),
        prop::collection::vec(1u8..=255, 1..40).prop_map(NarTree::symlink),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop::collection::btree_map(arb_name(), inner, 0..6).prop_map(NarTree::Directory)
    })
}

proptest! {
    #![proptest_config(pt_config(2000))]

    /// NARs of random trees under 1–5 structure-aware edits (1 in 8 also restored to disk).
    #[test]
    fn mutated_nars(
        tree in arb_tree(),
        donor in arb_tree(),
        ops in prop::collection::vec(nar_op(), 1..5),
        rng_seed in any::<u64>(),
    ) {
        let mut t = tree.to_nar().unwrap();
        let donor = donor.to_nar().unwrap();
        for op in &ops {
            apply_nar_op(&mut t, op, &donor);
        }
        check_nar(&t, rng_seed, rng_seed % 8 == 0)?;
    }

    /// Valid NARs are accepted, canonical, and every truncation is an end of input at the cut.
    #[test]
    fn valid_nars_and_their_truncations(tree in arb_tree(), cut in any::<Index>(), rng_seed in any::<u64>()) {
        let nar = tree.to_nar().unwrap();
        prop_assert!(check_nar(&nar, rng_seed, rng_seed % 16 == 0)?);
        let at = cut.index(nar.len());
        let mut r = &nar[..at];
        let e = NarTree::from_nar(&mut r, &NarLimits::default(), u64::MAX).unwrap_err();
        prop_assert!(matches!(e.kind, NarErrorKind::UnexpectedEof) && e.offset == at as u64, "cut at {}: {}", at, e);
    }

    /// Arbitrary bytes after the magic (and arbitrary bytes alone).
    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048), rng_seed in any::<u64>()) {
        check_nar(&bytes, rng_seed, false)?;
        let mut v = Vec::new();
        nar_str(&mut v, b"nix-archive-1");
        v.extend_from_slice(&bytes);
        check_nar(&v, rng_seed, false)?;
    }
}

/// A NAR of one file whose header is followed by `body`; with `size` as the declared length.
fn file_nar_with_size(size: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        nar_str(&mut v, w);
    }
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(body);
    v
}

#[test]
fn declared_lengths_far_beyond_the_input_allocate_nothing_of_that_size() {
    let mut rng = Rng::new(seed("declared_lengths"));
    let base = NarTree::dir([
        ("a", NarTree::file("hello")),
        ("l", NarTree::symlink("a")),
        ("x", NarTree::executable(vec![7u8; 100])),
    ])
    .to_nar()
    .unwrap();
    let toks = nar_tokens(&base);
    let lies = [
        u64::MAX,
        1 << 63,
        1 << 62,
        1 << 40,
        1 << 32,
        256 << 20,
        17 << 20,
    ];
    let mut checked = 0;
    for (k, &(l, ..)) in toks.iter().enumerate() {
        for lie in lies {
            let mut t = base.clone();
            t[l..l + 8].copy_from_slice(&lie.to_le_bytes());
            // No limit on the total held: only the parser's own bounds apply.
            let (res, peak) = peak_alloc(|| {
                NarTree::from_nar(t.as_slice(), &NarLimits::default(), u64::MAX).map(|_| ())
            });
            let e = res.expect_err("a lying length is an error");
            assert!(
                peak < 1 << 20,
                "token {k} with length {lie}: held {peak} bytes ({e})"
            );
            check_nar_error(&e, &t).unwrap();
            // Through restore too: nothing of that size is written or allocated.
            let tmp = tempfile::tempdir().unwrap();
            let (res, peak) =
                peak_alloc(|| restore(&mut NarReader::new(t.as_slice()), &tmp.path().join("r")));
            assert!(res.is_err());
            assert!(
                peak < 1 << 20,
                "restore, token {k} with length {lie}: held {peak}"
            );
            checked += 1;
        }
    }
    // A file that claims 2^62 bytes and delivers a random few: the end of input, after them.
    for _ in 0..cases(100) {
        let n = rng.below(100_000);
        let body = rng.bytes(n);
        let t = file_nar_with_size(rng.wild_len().max(body.len() as u64 + 1), &body);
        let (res, peak) =
            peak_alloc(|| NarTree::from_nar(t.as_slice(), &NarLimits::default(), u64::MAX));
        let e = res.unwrap_err();
        assert!(matches!(e.kind, NarErrorKind::UnexpectedEof), "{e}");
        assert_eq!(e.offset, t.len() as u64);
        // What was actually read is held (twice at most while growing) plus the copy buffer.
        assert!(
            peak <= 2 * body.len() + (256 << 10),
            "held {peak} for {} bytes",
            body.len()
        );
        checked += 1;
    }
    // The in-memory limit stops a big, honest file without holding it.
    let t = file_nar_with_size(8 << 20, &vec![1u8; 8 << 20]);
    let (res, peak) =
        peak_alloc(|| NarTree::from_nar(t.as_slice(), &NarLimits::default(), 1 << 20));
    let e = res.unwrap_err();
    assert!(matches!(e.kind, NarErrorKind::TooLarge(_)), "{e}");
    assert!(peak < 4 << 20, "{peak}");
    eprintln!("{checked} lying lengths");
}

/// `depth` nested directories named `name`, a file at the bottom.
fn deep_nar(depth: usize, name: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    nar_str(&mut v, b"nix-archive-1");
    for w in [&b"("[..], b"type", b"directory"] {
        nar_str(&mut v, w);
    }
    for _ in 1..depth {
        for w in [
            &b"entry"[..],
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"directory",
        ] {
            nar_str(&mut v, w);
        }
    }
    for w in [&b"entry"[..], b"(", b"name", b"f", b"node"] {
        nar_str(&mut v, w);
    }
    for w in [&b"("[..], b"type", b"regular", b"contents", b"bottom", b")"] {
        nar_str(&mut v, w);
    }
    nar_str(&mut v, b")");
    for _ in 1..depth {
        nar_str(&mut v, b")");
        nar_str(&mut v, b")");
    }
    nar_str(&mut v, b")");
    v
}

#[test]
fn deep_nars_do_not_overflow_the_stack_in_memory() {
    let limit = NarLimits::default().max_depth;
    on_small_stack(move || {
        // At the limit: accepted, and everything done with the tree works on a 2 MiB stack
        // (serialising, comparing and dropping it recurse once per level).
        let nar = deep_nar(limit, b"d");
        let tree = NarTree::from_nar(nar.as_slice(), &NarLimits::default(), u64::MAX)
            .expect("depth at the limit");
        assert_eq!(tree.to_nar().unwrap(), nar);
        assert_eq!(tree, tree.clone());
        drop(tree);
        // Events of the deepest file name its whole path.
        let (events, _, _) = nar_events(nar.as_slice()).unwrap();
        assert!(events.iter().any(|e| matches!(e,
            NarEvent::Regular { path, .. } if path.components().count() == limit)));
        // One deeper: refused where that directory starts.
        let nar = deep_nar(limit + 1, b"d");
        let e = NarTree::from_nar(nar.as_slice(), &NarLimits::default(), u64::MAX).unwrap_err();
        assert!(
            matches!(e.kind, NarErrorKind::TooDeep(l) if l == limit),
            "{e}"
        );
        assert!(e.to_string().contains("nested deeper than"), "{e}");
        // Far deeper, with the longest names: refused after the limit, memory bounded by it.
        let name = vec![b'n'; 255];
        let nar = deep_nar(20 * limit, &name);
        let (res, peak) =
            peak_alloc(|| NarTree::from_nar(nar.as_slice(), &NarLimits::default(), u64::MAX));
        assert!(matches!(res.unwrap_err().kind, NarErrorKind::TooDeep(_)));
        // The path of names (limit × 255 bytes) and one path buffer of that size: a few MiB,
        // not the input's 20×.
        assert!(
            peak < 4 * limit * 256 + (1 << 20),
            "{peak} for {} bytes",
            nar.len()
        );
    });
}

/// A tokio runtime, for the local store (its blocking methods need a handle).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn deep_trees_on_disk_do_not_overflow_the_stack() {
    use qr::store::Store as _;
    let limit = NarLimits::default().max_depth;
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime();
    let sd = StoreDir::default();
    let store = std::sync::Arc::new(
        rt.block_on(qr::store::LocalStore::open(
            sd.clone(),
            tmp.path().join("root"),
        ))
        .expect("store"),
    );
    // A NAR at the depth limit: restored, dumped, hashed, scanned and imported into the store
    // (which canonicalises, fsyncs and renames the tree) on 2 MiB stacks.
    let nar = deep_nar(limit, b"d");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let (w, n2) = (work.clone(), nar.clone());
    on_small_stack(move || {
        let dest = w.join("r");
        eprintln!("restore");
        restore(&mut NarReader::new(n2.as_slice()), &dest).expect("restore");
        eprintln!("dump");
        let mut again = Vec::new();
        dump_path(&dest, &mut again).expect("dump");
        assert!(again == n2);
        eprintln!("hash");
        qr::store::nar::nar_hash_and_size(&dest).expect("hash");
        eprintln!("scan");
        qr::store::refscan::scan_path(&dest, []).expect("scan");
    });
    let h = qr::store::hash::sha256(&nar);
    let path = sd.print(&sd.make_source_path("deep", &h, [], false));
    let info = qr::store::PathInfo {
        path: path.clone(),
        nar_hash: h,
        nar_size: nar.len() as u64,
        references: Default::default(),
        ca: None,
        deriver: None,
    };
    let (s, n3) = (store.clone(), nar.clone());
    eprintln!("import");
    on_small_stack(move || s.import_nar(&info, &mut n3.as_slice())).expect("import");
    eprintln!("export");
    assert!(rt.block_on(store.is_valid_path(&path)).unwrap());
    let s = store.clone();
    let p = path.clone();
    let exported = on_small_stack(move || {
        let mut out = Vec::new();
        s.export_nar(&p, &mut out).map(|_| out)
    })
    .expect("export");
    assert!(exported == nar);

    // A tree on disk as deep as paths allow (one-letter names until PATH_MAX): what a build
    // could leave in its output. Archiving it must fail cleanly or succeed, never overflow.
    let deep = tmp.path().join("deep");
    let mut p = deep.clone();
    std::fs::create_dir(&p).unwrap();
    let mut depth = 0;
    while p.as_os_str().len() + 2 < 4000 {
        p.push("a");
        std::fs::create_dir(&p).unwrap();
        depth += 1;
    }
    std::fs::write(p.join("f"), b"x").unwrap();
    let d2 = deep.clone();
    eprintln!("dump deep {depth}");
    let res = on_small_stack(move || {
        let mut out = Vec::new();
        dump_path(&d2, &mut out).map(|_| out)
    });
    match res {
        Ok(nar) => {
            // The reader refuses what is deeper than its limit, with a clear error.
            let r = NarTree::from_nar(nar.as_slice(), &NarLimits::default(), u64::MAX);
            if depth + 1 > limit {
                let e = r.unwrap_err();
                assert!(matches!(e.kind, NarErrorKind::TooDeep(_)), "{e}");
            } else {
                r.unwrap();
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    eprintln!("a tree {depth} directories deep");
}

/// A small random tree (names from a few letters, so siblings collide and sort interestingly).
fn random_tree(rng: &mut Rng, depth: usize) -> NarTree {
    match rng.below(if depth == 0 { 2 } else { 3 }) {
        0 => {
            let max = if rng.chance(0.1) { 200_000 } else { 300 };
            let n = rng.below(max);
            NarTree::Regular {
                executable: rng.chance(0.3),
                contents: rng.bytes(n),
            }
        }
        1 => NarTree::symlink(format!("../t{}", rng.below(100))),
        _ => {
            let n = rng.below(5);
            NarTree::dir((0..n).map(|_| {
                let first = *rng.pick(&["a", "B", "é", "z.", "-"]);
                let name = format!("{first}{}", rng.below(9));
                (name, random_tree(rng, depth - 1))
            }))
        }
    }
}

#[test]
fn nar_imports_into_the_store_verify_everything() {
    use qr::store::Store as _;
    let mut rng = Rng::new(seed("nar_imports"));
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime();
    let sd = StoreDir::default();
    let root = tmp.path().join("root");
    let store = rt
        .block_on(qr::store::LocalStore::open(sd.clone(), &root))
        .expect("store");
    let mut valid = std::collections::BTreeSet::new();
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..cases(300) {
        let tree = random_tree(&mut rng, 3);
        let nar = tree.to_nar().unwrap();
        let h = qr::store::hash::sha256(&nar);
        let path = sd.print(&sd.make_source_path(&format!("t{i}"), &h, [], false));
        let info = qr::store::PathInfo {
            path: path.clone(),
            nar_hash: h,
            nar_size: nar.len() as u64,
            references: Default::default(),
            ca: None,
            deriver: None,
        };
        // What arrives: the NAR, damaged (or not) as a lying or broken sender would.
        let mut sent = nar.clone();
        match rng.below(6) {
            0 => {}
            1 => sent.truncate(rng.below(nar.len())),
            2 => {
                let k = 1 + rng.below(100);
                sent.extend(rng.bytes(k));
            }
            3 => {
                let at = rng.below(nar.len());
                sent[at] ^= 1 << rng.below(8);
            }
            4 => {
                let toks = nar_tokens(&nar);
                let (l, ..) = toks[rng.below(toks.len())];
                sent[l..l + 8].copy_from_slice(&rng.wild_len().to_le_bytes());
            }
            _ => {
                let other = random_tree(&mut rng, 2).to_nar().unwrap();
                sent = other;
            }
        }
        let res = store.import_nar(&info, &mut sent.as_slice());
        let is_valid = rt.block_on(store.is_valid_path(&path)).unwrap();
        // The reader stops at the end of the NAR: bytes after it are not part of the path.
        let whole = sent.starts_with(&nar);
        match res {
            Ok(()) => {
                assert!(whole, "accepted a damaged NAR for {path}");
                assert!(is_valid);
                valid.insert(path.rsplit('/').next().unwrap().to_string());
                accepted += 1;
            }
            Err(e) => {
                assert!(!whole, "refused a whole NAR for {path}: {e}");
                assert!(!is_valid, "{path} valid after a failed import");
                let msg = e.to_string();
                assert!(msg.contains(&path), "the error names the path: {msg}");
                refused += 1;
            }
        }
    }
    // Nothing of the failed imports is left in the store: only the valid paths (and the
    // store's own metadata).
    for e in std::fs::read_dir(&root).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            (name.starts_with('.') && !name.starts_with(".qr-tmp-")) || valid.contains(&name),
            "{name} left in the store"
        );
    }
    eprintln!("{accepted} imports accepted, {refused} refused");
    assert!(accepted > 0 && refused > 0);
}

// --- the other strings a builder sends: hashes and store paths -----------------------------------

#[test]
fn hashes_and_store_paths_from_the_wire() {
    let mut rng = Rng::new(seed("hashes_and_store_paths"));
    let sd = StoreDir::default();
    let valid_hash = qr::store::hash::render_nix32(&[7; 32]);
    let valid_path = format!("{}/{}-name", sd, "0".repeat(32));
    let mut n = 0;
    for _ in 0..cases(40_000) {
        let base = match rng.below(4) {
            0 => valid_hash.clone(),
            1 => format!("sha256:{valid_hash}"),
            2 => valid_path.clone(),
            _ => {
                let n = rng.below(80);
                rng.string(n)
            }
        };
        let mut s: Vec<char> = base.chars().collect();
        for _ in 0..rng.below(4) {
            let i = rng.below(s.len() + 1);
            match rng.below(3) {
                0 if i < s.len() => s[i] = rng.string(1).chars().next().unwrap(),
                1 => s.insert(i, rng.string(1).chars().next().unwrap()),
                _ => s.truncate(i),
            }
        }
        let s: String = s.into_iter().collect();
        if let Err(e) = qr::store::hash::parse_sha256(&s) {
            assert!(!e.to_string().is_empty());
        }
        match sd.parse(&s) {
            Ok(p) => assert_eq!(sd.print(&p), s, "a parsed path prints back identically"),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        let _ = sd.to_store_path(&s);
        n += 1;
    }
    // A gigantic claimed hash is refused without being decoded into anything large.
    let huge = "z".repeat(16 << 20);
    let (res, peak) = peak_alloc(|| qr::store::hash::parse_sha256(&huge));
    assert!(res.is_err());
    assert!(peak < 1 << 20, "{peak}");
    eprintln!("{n} strings");
}
