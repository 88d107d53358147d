use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::store::hash::{render_sri, sha256};

/// NAR string encoding, for hand-built test input.
fn s(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
    out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
}

fn toks(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        s(&mut v, p);
    }
    v
}

fn parse(bytes: &[u8]) -> Result<NarTree, NarError> {
    let mut r = bytes;
    let mut nar = NarReader::new(&mut r);
    let t = NarTree::from_reader(&mut nar, 1 << 24)?;
    nar.expect_eof()?;
    Ok(t)
}

#[test]
fn hello_file_matches_nix() {
    // chain-a in ../shared/fixtures/nix-oracle/chain.json: `echo hello > $out`.
    let t = NarTree::file("hello\n");
    let nar = t.to_nar().unwrap();
    assert_eq!(nar.len(), 120);
    let expected = toks(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"hello\n",
        b")",
    ]);
    assert_eq!(nar, expected);
    assert_eq!(
        render_sri(&sha256(&nar)),
        "sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM="
    );
    assert_eq!(tree_hash_and_size(&t).unwrap(), (sha256(&expected), 120));
}

#[test]
fn flat_fod_hello_matches_nix() {
    // mx-fod in mixed.json: `printf hello > $out`, narSize 120.
    let (h, n) = tree_hash_and_size(&NarTree::file("hello")).unwrap();
    assert_eq!(n, 120);
    assert_eq!(
        render_sri(&h),
        "sha256-CkMIecJm+LV/QJKg+TXPP6zUi7zN5XYNR0jKQFFx6Wk="
    );
}

fn sample_tree() -> NarTree {
    NarTree::dir([
        (
            "bin",
            NarTree::dir([("run", NarTree::executable("#!/bin/sh\n"))]),
        ),
        ("B", NarTree::file("upper sorts first")),
        ("a-link", NarTree::symlink("bin/run")),
        ("empty", NarTree::file("")),
        ("emptydir", NarTree::dir::<&str>([])),
        ("\u{e9}t\u{e9}", NarTree::file("non-ascii sorts last")),
        ("eight888", NarTree::file("12345678")),
    ])
}

#[test]
fn directory_layout_is_exact() {
    let t = NarTree::dir([
        ("b", NarTree::symlink("a")),
        ("a", NarTree::executable("x")),
    ]);
    let nar = t.to_nar().unwrap();
    let expected = toks(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"a",
        b"node",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"",
        b"contents",
        b"x",
        b")",
        b")",
        b"entry",
        b"(",
        b"name",
        b"b",
        b"node",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"a",
        b")",
        b")",
        b")",
    ]);
    assert_eq!(nar, expected);
}

fn materialise(t: &NarTree, p: &Path) {
    match t {
        NarTree::Regular {
            executable,
            contents,
        } => {
            fs::write(p, contents).unwrap();
            let mode = if *executable { 0o755 } else { 0o644 };
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        }
        NarTree::Symlink { target } => {
            use std::os::unix::ffi::OsStrExt;
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), p).unwrap();
        }
        NarTree::Directory(entries) => {
            fs::create_dir(p).unwrap();
            for (name, child) in entries {
                use std::os::unix::ffi::OsStrExt;
                materialise(child, &p.join(std::ffi::OsStr::from_bytes(name)));
            }
        }
    }
}

#[test]
fn dump_path_equals_tree_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let t = sample_tree();
    let src = tmp.path().join("src");
    materialise(&t, &src);
    let mut from_fs = Vec::new();
    let n = dump_path(&src, &mut from_fs).unwrap();
    assert_eq!(n, from_fs.len() as u64);
    let from_tree = t.to_nar().unwrap();
    assert_eq!(from_fs, from_tree);
    assert_eq!(
        nar_hash_and_size(&src).unwrap(),
        (sha256(&from_fs), from_fs.len() as u64)
    );

    // write -> read -> restore -> write gives the same bytes.
    let dest = tmp.path().join("dest");
    let mut r = from_fs.as_slice();
    let mut nar = NarReader::new(&mut r);
    restore(&mut nar, &dest).unwrap();
    nar.expect_eof().unwrap();
    let mut again = Vec::new();
    dump_path(&dest, &mut again).unwrap();
    assert_eq!(again, from_fs);
    assert_eq!(parse(&from_fs).unwrap(), t);
    assert_eq!(NarTree::from_path(&dest).unwrap(), t);
}

#[test]
fn root_symlink_and_file_restore() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, t) in [NarTree::symlink("/nix/store/x"), NarTree::executable("hi")]
        .iter()
        .enumerate()
    {
        let nar = t.to_nar().unwrap();
        let dest = tmp.path().join(format!("r{i}"));
        restore(&mut NarReader::new(nar.as_slice()), &dest).unwrap();
        let mut again = Vec::new();
        dump_path(&dest, &mut again).unwrap();
        assert_eq!(again, nar);
    }
}

#[test]
fn events_are_streamed_in_order() {
    let nar = sample_tree().to_nar().unwrap();
    let mut nar_r = NarReader::new(nar.as_slice());
    let mut evs = Vec::new();
    while let Some(e) = nar_r.next_event().unwrap() {
        // Contents left unread are skipped.
        evs.push(e);
    }
    assert_eq!(nar_r.offset(), nar.len() as u64);
    let paths: Vec<String> = evs
        .iter()
        .filter_map(|e| match e {
            NarEvent::Directory { path }
            | NarEvent::Regular { path, .. }
            | NarEvent::Symlink { path, .. } => Some(path.display().to_string()),
            NarEvent::EndDirectory => None,
        })
        .collect();
    assert_eq!(
        paths,
        [
            "",
            "B",
            "a-link",
            "bin",
            "bin/run",
            "eight888",
            "empty",
            "emptydir",
            "\u{e9}t\u{e9}"
        ]
    );
}

#[test]
fn unsupported_file_type_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    assert!(matches!(
        dump_path(tmp.path(), std::io::sink()),
        Err(NarWriteError::Unsupported { kind: "FIFO", .. })
    ));
}

#[test]
fn invalid_tree_names_are_refused_by_the_writer() {
    for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
        let t = NarTree::Directory([(bad.to_vec(), NarTree::file("x"))].into_iter().collect());
        assert!(matches!(t.to_nar(), Err(NarWriteError::InvalidName { .. })));
    }
}

// --- malformed input: each is a clear, typed error with the offset of the offending item ---

fn err_of(bytes: &[u8]) -> NarError {
    match parse(bytes) {
        Err(e) => e,
        Ok(t) => panic!("accepted malformed NAR as {t:?}"),
    }
}

fn dir_with_names(names: &[&[u8]]) -> Vec<u8> {
    let mut v = toks(&[b"nix-archive-1", b"(", b"type", b"directory"]);
    for n in names {
        v.extend(toks(&[b"entry", b"(", b"name", n, b"node"]));
        v.extend(toks(&[
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"",
            b")",
            b")",
        ]));
    }
    v.extend(toks(&[b")"]));
    v
}

#[test]
fn bad_magic() {
    let e = err_of(&toks(&[b"nix-archive-2", b"("]));
    assert!(matches!(e.kind, NarErrorKind::BadMagic), "{e}");
    assert_eq!(e.offset, 0);
    let e = err_of(b"");
    assert!(matches!(e.kind, NarErrorKind::UnexpectedEof), "{e}");
    let e = err_of(&u64::MAX.to_le_bytes());
    assert!(matches!(e.kind, NarErrorKind::BadMagic), "{e}");
}

#[test]
fn non_zero_padding() {
    let mut nar = NarTree::file("hello\n").to_nar().unwrap();
    // contents "hello\n" start at 24+16*4+8 = 96; padding at 102..104.
    nar[103] = 1;
    let e = err_of(&nar);
    assert!(matches!(e.kind, NarErrorKind::NonZeroPadding), "{e}");
    assert_eq!(e.offset, 103);
    let mut nar = NarTree::file("hello\n").to_nar().unwrap();
    nar[21] = b'x'; // the magic's padding
    assert!(matches!(err_of(&nar).kind, NarErrorKind::NonZeroPadding));
}

#[test]
fn unsorted_and_duplicate_entries() {
    let good = dir_with_names(&[b"a", b"b"]);
    assert!(parse(&good).is_ok());
    let e = err_of(&dir_with_names(&[b"b", b"a"]));
    assert!(matches!(e.kind, NarErrorKind::Unsorted { .. }), "{e}");
    let e = err_of(&dir_with_names(&[b"a", b"a"]));
    assert!(matches!(e.kind, NarErrorKind::Duplicate { .. }), "{e}");
    // The offset is that of the second name string.
    let first_entry_len = (dir_with_names(&[b"a"]).len() - dir_with_names(&[]).len()) as u64;
    let header = toks(&[b"nix-archive-1", b"(", b"type", b"directory"]).len() as u64;
    let name_in_entry = toks(&[b"entry", b"(", b"name"]).len() as u64;
    assert_eq!(e.offset, header + first_entry_len + name_in_entry);
    // Byte order, not locale order: "B" < "a".
    assert!(parse(&dir_with_names(&[b"B", b"a"])).is_ok());
    assert!(parse(&dir_with_names(&[b"a", b"B"])).is_err());
}

#[test]
fn invalid_names() {
    for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"x\0"] {
        let e = err_of(&dir_with_names(&[bad]));
        assert!(
            matches!(e.kind, NarErrorKind::InvalidName { .. }),
            "{bad:?}: {e}"
        );
    }
}

#[test]
fn absurd_lengths() {
    // A name claiming 2^62 bytes: refused before allocating.
    let mut v = toks(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
    ]);
    let at = v.len() as u64;
    v.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let e = err_of(&v);
    assert!(
        matches!(
            e.kind,
            NarErrorKind::TooLong {
                what: "entry name",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.offset, at);
    // A token claiming u64::MAX bytes.
    let mut v = toks(&[b"nix-archive-1"]);
    v.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        err_of(&v).kind,
        NarErrorKind::UnexpectedToken { .. }
    ));
    // A file claiming 2^62 bytes streams until the input ends.
    let mut v = toks(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    v.extend_from_slice(&(1u64 << 62).to_le_bytes());
    v.extend_from_slice(b"short");
    let e = err_of(&v);
    assert!(matches!(e.kind, NarErrorKind::UnexpectedEof), "{e}");
    assert_eq!(e.offset, v.len() as u64);
    // Limits can refuse it up front.
    let limits = NarLimits {
        max_file_size: 1 << 20,
        ..NarLimits::default()
    };
    let e = NarTree::from_nar(v.as_slice(), &limits, u64::MAX).unwrap_err();
    assert!(matches!(e.kind, NarErrorKind::TooLong { what: "file", .. }));
    // A symlink target longer than PATH_MAX.
    let long = vec![b'a'; 5000];
    let v = toks(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"target",
        &long,
        b")",
    ]);
    assert!(matches!(err_of(&v).kind, NarErrorKind::TooLong { .. }));
}

#[test]
fn other_malformations() {
    // executable marker with a value
    let v = toks(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"1",
        b"contents",
        b"",
        b")",
    ]);
    assert!(matches!(err_of(&v).kind, NarErrorKind::ExecutableNotEmpty));
    // non-canonical field order
    let v = toks(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"",
        b"executable",
        b"",
        b")",
    ]);
    assert!(matches!(
        err_of(&v).kind,
        NarErrorKind::UnexpectedToken { .. }
    ));
    // unknown type, empty symlink target, NUL in target
    for v in [
        toks(&[b"nix-archive-1", b"(", b"type", b"fifo", b")"]),
        toks(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"",
            b")",
        ]),
        toks(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"a\0",
            b")",
        ]),
    ] {
        assert!(parse(&v).is_err());
    }
    // trailing data
    let mut v = NarTree::file("x").to_nar().unwrap();
    let end = v.len() as u64;
    v.push(0);
    let e = err_of(&v);
    assert!(matches!(e.kind, NarErrorKind::TrailingData), "{e}");
    assert_eq!(e.offset, end);
    // too deep
    let mut t = NarTree::file("x");
    for _ in 0..10 {
        t = NarTree::dir([("d", t)]);
    }
    let limits = NarLimits {
        max_depth: 5,
        ..NarLimits::default()
    };
    let nar = t.to_nar().unwrap();
    let e = NarTree::from_nar(nar.as_slice(), &limits, u64::MAX).unwrap_err();
    assert!(matches!(e.kind, NarErrorKind::TooDeep(5)));
    // in-memory size cap
    let nar = NarTree::file(vec![7u8; 1000]).to_nar().unwrap();
    let e = NarTree::from_nar(nar.as_slice(), &NarLimits::default(), 100).unwrap_err();
    assert!(matches!(e.kind, NarErrorKind::TooLarge(100)));
    // a poisoned reader stays failed
    let mut r = NarReader::new(&b"garbage!"[..]);
    assert!(r.next_event().is_err());
    assert!(matches!(
        r.next_event().unwrap_err().kind,
        NarErrorKind::Poisoned
    ));
}

#[test]
fn restore_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let nar = NarTree::file("x").to_nar().unwrap();
    let dest = tmp.path().join("exists");
    fs::write(&dest, "old").unwrap();
    assert!(matches!(
        restore(&mut NarReader::new(nar.as_slice()), &dest),
        Err(RestoreError::Io { .. })
    ));
    assert_eq!(fs::read(&dest).unwrap(), b"old");
}

// --- property tests ---

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-zA-Z0-9._-]{1,12}".prop_map(String::into_bytes),
        proptest::collection::vec(1u8..=255, 1..8),
    ]
    .prop_filter("valid entry name", |n| validate_entry_name(n).is_ok())
}

fn arb_tree() -> impl Strategy<Value = NarTree> {
    let leaf = prop_oneof![
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(
            |(executable, contents)| NarTree::Regular {
                executable,
                contents
            }
        ),
        proptest::collection::vec(1u8..=255, 1..30).prop_map(|target| NarTree::Symlink { target }),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        proptest::collection::btree_map(arb_name(), inner, 0..6).prop_map(NarTree::Directory)
    })
}

/// Whatever the parser accepts must re-serialise to exactly the bytes it consumed.
fn check_parse_is_canonical(bytes: &[u8]) {
    let mut r = bytes;
    let mut nar = NarReader::new(&mut r);
    if let Ok(t) = NarTree::from_reader(&mut nar, 1 << 20) {
        let consumed = nar.offset() as usize;
        assert_eq!(t.to_nar().unwrap(), &bytes[..consumed]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check_parse_is_canonical(&bytes);
        // Also with a valid prefix, so the parser gets past the magic.
        let mut v = toks(&[b"nix-archive-1"]);
        v.extend_from_slice(&bytes);
        check_parse_is_canonical(&v);
    }

    #[test]
    fn mutated_nars_never_panic(
        t in arb_tree(),
        muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..4),
    ) {
        let mut v = t.to_nar().unwrap();
        for (idx, byte, op) in muts {
            if v.is_empty() { break; }
            let i = idx.index(v.len());
            match op {
                0 => v[i] = byte,
                1 => v[i] ^= 1 << (byte % 8),
                2 => v.truncate(i),
                _ => v.insert(i, byte),
            }
        }
        check_parse_is_canonical(&v);
    }

    #[test]
    fn trees_round_trip_in_memory(t in arb_tree()) {
        let nar = t.to_nar().unwrap();
        prop_assert_eq!(parse(&nar).unwrap(), t);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn trees_round_trip_through_the_filesystem(t in arb_tree()) {
        let tmp = tempfile::tempdir().unwrap();
        let nar = t.to_nar().unwrap();
        let dest = tmp.path().join("r");
        restore(&mut NarReader::new(nar.as_slice()), &dest).unwrap();
        let mut again = Vec::new();
        dump_path(&dest, &mut again).unwrap();
        prop_assert_eq!(again, nar);
    }
}
