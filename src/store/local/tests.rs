use super::*;
use crate::store::nar::NarTree;

const DRV: &str = r#"Derive([("out","/nix/store/9g88l3kmpnlsx5wamsbfm5h9s30i7ba3-mx-ia-leaf","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo ia-leaf > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","mx-ia-leaf"),("out","/nix/store/9g88l3kmpnlsx5wamsbfm5h9s30i7ba3-mx-ia-leaf"),("system","x86_64-linux")])"#;
const DRV_PATH: &str = "/nix/store/p1qxcx8sbmi2zvx8dk4944x7hnlh4fly-mx-ia-leaf.drv";

async fn open(root: &Path) -> LocalStore {
    LocalStore::open(StoreDir::default(), root).await.unwrap()
}

fn entries(root: &Path) -> BTreeSet<String> {
    fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != META_DIR)
        .collect()
}

fn nar_of(tree: &NarTree) -> Vec<u8> {
    tree.to_nar().unwrap()
}

fn info_for(store: &LocalStore, name: &str, tree: &NarTree) -> PathInfo {
    let nar = nar_of(tree);
    let h = sha256(&nar);
    let sd = store.store_dir();
    PathInfo {
        path: sd.print(&sd.make_source_path(name, &h, [], false)),
        nar_hash: h,
        nar_size: nar.len() as u64,
        references: BTreeSet::new(),
        ca: None,
        deriver: None,
    }
}

#[tokio::test]
async fn text_paths_and_derivations() {
    let d = tempfile::tempdir().unwrap();
    let store = open(d.path()).await;
    let p = store
        .add_text("mx-ia-leaf.drv", DRV, &BTreeSet::new())
        .await
        .unwrap();
    assert_eq!(p, DRV_PATH);
    // Idempotent.
    assert_eq!(
        store
            .add_text("mx-ia-leaf.drv", DRV, &BTreeSet::new())
            .await
            .unwrap(),
        DRV_PATH
    );
    let drv = store.read_derivation(DRV_PATH).await.unwrap();
    assert_eq!(drv.name, "mx-ia-leaf");
    assert_eq!(drv.to_aterm(), DRV);
    let info = store.query_path_info(DRV_PATH).await.unwrap().unwrap();
    assert!(info.ca.as_deref().unwrap().starts_with("text:sha256:"));
    let phys = store.physical_path(DRV_PATH).unwrap();
    assert_eq!(fs::read_to_string(&phys).unwrap(), DRV);
    // Canonical metadata: read-only, mtime 1.
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(&phys).unwrap();
    assert_eq!((m.mode() & 0o777, m.mtime()), (0o444, 1));
    // A reference that is not valid.
    let refs: BTreeSet<String> = [DRV_PATH.replace("p1qx", "p1qy")].into();
    assert!(matches!(
        store.add_text("x", "y", &refs).await,
        Err(StoreError::NotValid(_))
    ));
    // Not in the store dir.
    assert!(matches!(
        store.is_valid_path("/tmp/x").await,
        Err(StoreError::BadPath(_))
    ));
}

#[tokio::test]
async fn malformed_derivation_names_the_byte_offset() {
    let d = tempfile::tempdir().unwrap();
    let store = open(d.path()).await;
    let p = store
        .add_text("bad.drv", "Derive([(\"out\",", &BTreeSet::new())
        .await
        .unwrap();
    let e = store.read_derivation(&p).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("malformed derivation {p}: unexpected end of input, expected '\"' at byte 15")
    );
    let e = store
        .read_derivation("/nix/store/p1qxcx8sbmi2zvx8dk4944x7hnlh4fly-other.drv")
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotValid(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nar_export_import_round_trip_and_verification() {
    let d = tempfile::tempdir().unwrap();
    let a = Arc::new(open(&d.path().join("a")).await);
    let b = Arc::new(open(&d.path().join("b")).await);
    let tree = NarTree::dir([
        (
            "bin",
            NarTree::dir([("hello", NarTree::executable("#!/bin/sh\n"))]),
        ),
        ("link", NarTree::symlink("bin/hello")),
        ("data", NarTree::file(vec![7u8; 100_000])),
    ]);
    let info = info_for(&a, "pkg", &tree);
    let nar = nar_of(&tree);
    {
        let (a, info, nar) = (a.clone(), info.clone(), nar.clone());
        tokio::task::spawn_blocking(move || a.import_nar(&info, &mut &nar[..]))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        a.query_path_info(&info.path).await.unwrap(),
        Some(info.clone())
    );
    // Export from a, import into b.
    let exported = {
        let (a, p) = (a.clone(), info.path.clone());
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let n = a.export_nar(&p, &mut out).unwrap();
            assert_eq!(n as usize, out.len());
            out
        })
        .await
        .unwrap()
    };
    assert_eq!(exported, nar);

    // A wrong narHash is refused and nothing becomes valid or stays on disk.
    let mut wrong = info.clone();
    wrong.nar_hash = sha256(b"something else");
    let before = entries(b.root());
    let r = {
        let (b, exported) = (b.clone(), exported.clone());
        tokio::task::spawn_blocking(move || b.import_nar(&wrong, &mut &exported[..]))
            .await
            .unwrap()
    };
    assert!(matches!(r, Err(StoreError::HashMismatch { .. })), "{r:?}");
    assert!(!b.is_valid_path(&info.path).await.unwrap());
    assert_eq!(entries(b.root()), before);

    // A corrupted NAR (a flipped byte in a file's contents) is refused too.
    let mut corrupt = exported.clone();
    let pos = corrupt.windows(4).position(|w| w == [7, 7, 7, 7]).unwrap();
    corrupt[pos] = 8;
    let r = {
        let (b, info) = (b.clone(), info.clone());
        tokio::task::spawn_blocking(move || b.import_nar(&info, &mut &corrupt[..]))
            .await
            .unwrap()
    };
    let e = r.unwrap_err();
    assert!(e.to_string().contains("NAR hash or size mismatch"), "{e}");
    // A truncated NAR is a NAR error.
    let r = {
        let (b, info, t) = (
            b.clone(),
            info.clone(),
            exported[..exported.len() - 9].to_vec(),
        );
        tokio::task::spawn_blocking(move || b.import_nar(&info, &mut &t[..]))
            .await
            .unwrap()
    };
    assert!(matches!(r, Err(StoreError::Nar { .. })), "{r:?}");
    assert!(!b.is_valid_path(&info.path).await.unwrap());
    assert_eq!(entries(b.root()), before);

    // The genuine NAR imports, and the contents match.
    {
        let (b, info) = (b.clone(), info.clone());
        tokio::task::spawn_blocking(move || b.import_nar(&info, &mut &exported[..]))
            .await
            .unwrap()
            .unwrap();
    }
    let phys = b.physical_path(&info.path).unwrap();
    assert_eq!(NarTree::from_path(&phys).unwrap(), tree);
    assert_eq!(b.query_path_info(&info.path).await.unwrap(), Some(info));
}

#[tokio::test]
async fn gc_roots_keep_closures_alive() {
    let d = tempfile::tempdir().unwrap();
    let store = open(d.path()).await;
    let leaf = store
        .add_text("leaf", "leaf", &BTreeSet::new())
        .await
        .unwrap();
    let mid = store
        .add_text("mid", &format!("uses {leaf}"), &[leaf.clone()].into())
        .await
        .unwrap();
    let other = store
        .add_text("other", "x", &BTreeSet::new())
        .await
        .unwrap();
    assert!(matches!(
        store
            .add_gc_root("r", "/nix/store/00000000000000000000000000000000-none")
            .await,
        Err(StoreError::NotValid(_))
    ));
    store.add_gc_root("r", &mid).await.unwrap();
    // A reservation (a running build) keeps its path alive too.
    let res = store.reserve([store.store_dir().parse(&other).unwrap().base_name()]);
    let report = store.collect_garbage().await.unwrap();
    assert!(report.deleted.is_empty(), "{report:?}");
    drop(res);
    let report = store.collect_garbage().await.unwrap();
    assert_eq!(report.deleted, vec![other.clone()]);
    assert!(!store.is_valid_path(&other).await.unwrap());
    assert!(
        store
            .physical_path(&other)
            .unwrap()
            .symlink_metadata()
            .is_err()
    );
    assert_eq!(
        store.gc_roots().await.unwrap(),
        vec![("r".into(), mid.clone())]
    );
    store.remove_gc_root("r").await.unwrap();
    let report = store.collect_garbage().await.unwrap();
    assert_eq!(report.deleted.len(), 2);
    assert!(
        entries(store.root()).is_empty(),
        "{:?}",
        entries(store.root())
    );
    assert!(store.valid_paths().await.unwrap().is_empty());
}

#[tokio::test]
async fn realisations_through_the_trait() {
    let d = tempfile::tempdir().unwrap();
    let store = open(d.path()).await;
    let out = store.add_text("o", "o", &BTreeSet::new()).await.unwrap();
    let key = DrvOutput::new(DRV_PATH, "out");
    assert_eq!(store.query_realisation(&key).await.unwrap(), None);
    store.register_realisation(&key, &out).await.unwrap();
    assert_eq!(store.query_realisation(&key).await.unwrap(), Some(out));
}

#[tokio::test]
async fn interrupted_registration_is_rolled_back_on_open() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("s");
    let store = open(&root).await;
    let kept = store
        .add_text("kept", "kept", &BTreeSet::new())
        .await
        .unwrap();
    store.set_fault_hook(Some(Arc::new(|_| Err("simulated crash".into()))));
    let e = store
        .add_text("lost", "lost", &BTreeSet::new())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "store metadata: injected fault: simulated crash"
    );
    let lost = store
        .store_dir()
        .print(&store.store_dir().make_text_path("lost", b"lost", []));
    // Contents are in place (as after a crash at that point) but not registered.
    assert!(store.physical_path(&lost).unwrap().exists());
    assert!(!store.is_valid_path(&lost).await.unwrap());
    // Leftover staging directories, as a crash would leave them.
    fs::create_dir(root.join(".qr-tmp-leftover")).unwrap();
    store.close().await;
    drop(store);

    let store = open(&root).await;
    let base = |p: &str| StoreDir::default().parse(p).unwrap().base_name();
    assert_eq!(entries(&root), [base(&kept)].into());
    assert!(store.is_valid_path(&kept).await.unwrap());
    // Re-adding works.
    assert_eq!(
        store
            .add_text("lost", "lost", &BTreeSet::new())
            .await
            .unwrap(),
        lost
    );
    assert!(store.is_valid_path(&lost).await.unwrap());
    // A registered path whose contents vanished is invalidated on open, with its referrers.
    let user = store
        .add_text("user", &lost, &[lost.clone()].into())
        .await
        .unwrap();
    remove_tree(&store.physical_path(&lost).unwrap()).unwrap();
    store.close().await;
    drop(store);
    let store = open(&root).await;
    assert!(!store.is_valid_path(&lost).await.unwrap());
    assert!(!store.is_valid_path(&user).await.unwrap());
    assert!(store.is_valid_path(&kept).await.unwrap());
    assert_eq!(entries(&root), [base(&kept)].into());
}

#[tokio::test]
async fn a_second_opener_does_not_sweep_in_flight_entries() {
    let d = tempfile::tempdir().unwrap();
    let first = open(d.path()).await;
    fs::write(d.path().join(".qr-tmp-inflight"), "x").unwrap();
    let second = open(d.path()).await;
    assert!(d.path().join(".qr-tmp-inflight").exists());
    drop(second);
    first.close().await;
    drop(first);
    let _third = open(d.path()).await;
    assert!(!d.path().join(".qr-tmp-inflight").exists());
}

#[tokio::test]
async fn a_failed_registration_takes_the_contents_back() {
    let d = tempfile::tempdir().unwrap();
    let store = open(d.path()).await;
    let staging = StagingDir::new(store.root(), "tmp").unwrap();
    let staged = staging.path().join("x");
    fs::write(&staged, "x").unwrap();
    let (h, n) = nar_hash_and_size(&staged).unwrap();
    let sd = store.store_dir().clone();
    let path = sd.print(&sd.make_source_path("x", &h, [], false));
    let info = PathInfo {
        path: path.clone(),
        nar_hash: h,
        nar_size: n,
        // Not valid: the metadata transaction refuses it.
        references: ["/nix/store/00000000000000000000000000000000-missing".to_string()].into(),
        ca: None,
        deriver: None,
    };
    let e = store
        .register_staged(vec![StagedPath { info, staged }], vec![])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is not valid"), "{e}");
    assert!(!store.is_valid_path(&path).await.unwrap());
    drop(staging);
    assert!(
        entries(store.root()).is_empty(),
        "{:?}",
        entries(store.root())
    );
}

#[tokio::test]
async fn source_paths_are_content_addressed() {
    let d = tempfile::tempdir().unwrap();
    let store = open(&d.path().join("s")).await;
    let src = d.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/a"), "a").unwrap();
    let p = store.add_source_path("src", &src).await.unwrap();
    let (h, n) = nar_hash_and_size(&src).unwrap();
    let sd = store.store_dir();
    assert_eq!(p, sd.print(&sd.make_source_path("src", &h, [], false)));
    let info = store.query_path_info(&p).await.unwrap().unwrap();
    assert_eq!((info.nar_hash, info.nar_size), (h, n));
    assert_eq!(
        info.ca,
        Some(format!("fixed:r:sha256:{}", nix32::encode(&h)))
    );
    assert_eq!(store.add_source_path("src", &src).await.unwrap(), p);
}

#[tokio::test]
async fn rooted_derivations_long_names_and_grouped_realisations() {
    let d = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(d.path()).await);
    // A drv and its root in one registration: it survives a collection, its root is listed.
    let drv = crate::store::aterm::parse_named(DRV.as_bytes(), "mx-ia-leaf").unwrap();
    let p = store
        .add_derivation_rooted(&drv, "resolved-")
        .await
        .unwrap();
    assert_eq!(p, DRV_PATH);
    let base = p.rsplit('/').next().unwrap();
    assert_eq!(
        store.gc_roots().await.unwrap(),
        vec![(format!("resolved-{base}"), p.clone())]
    );
    // Again (already valid): the same path, the root kept.
    assert_eq!(
        store
            .add_derivation_rooted(&drv, "resolved-")
            .await
            .unwrap(),
        p
    );
    assert!(store.collect_garbage().await.unwrap().deleted.is_empty());
    // The longest name a store path may have is staged and registered too.
    let long = "n".repeat(211);
    let lp = store.add_text(&long, "x", &BTreeSet::new()).await.unwrap();
    assert!(store.is_valid_path(&lp).await.unwrap());
    // Concurrent realisations share group commits; a conflicting one fails only its caller.
    let outs: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..16 {
            v.push(
                store
                    .add_text(&format!("o{i}"), &format!("{i}"), &BTreeSet::new())
                    .await
                    .unwrap(),
            );
        }
        v
    };
    let mut tasks = Vec::new();
    for (i, o) in outs.iter().enumerate() {
        let (s, o) = (store.clone(), o.clone());
        tasks.push(tokio::spawn(async move {
            let key = DrvOutput::new(format!("/nix/store/{:032}-d{i}.drv", i), "out");
            s.register_realisation(&key, &o).await
        }));
    }
    // Conflicts with the first one's (same key, another path).
    let clash = {
        let s = store.clone();
        let o = outs[1].clone();
        tokio::spawn(async move {
            let key = DrvOutput::new(format!("/nix/store/{:032}-d0.drv", 0), "out");
            s.register_realisation(&key, &o).await
        })
    };
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap().is_ok());
    }
    let clash = clash.await.unwrap();
    // Whichever of the two d0 registrations committed first wins; the other is a conflict.
    let key0 = DrvOutput::new(format!("/nix/store/{:032}-d0.drv", 0), "out");
    let won = store.query_realisation(&key0).await.unwrap().unwrap();
    if won == outs[0] {
        assert_eq!(ok, 16);
        assert!(
            matches!(clash, Err(StoreError::RealisationConflict { .. })),
            "{clash:?}"
        );
    } else {
        assert_eq!(won, outs[1]);
        assert_eq!(ok, 15);
        assert!(clash.is_ok());
    }
    for (i, o) in outs.iter().enumerate().skip(1) {
        let key = DrvOutput::new(format!("/nix/store/{:032}-d{i}.drv", i), "out");
        assert_eq!(
            store.query_realisation(&key).await.unwrap().as_ref(),
            Some(o)
        );
    }
    assert!(
        entries(store.root()).iter().all(|e| !e.starts_with('.')),
        "{:?}",
        entries(store.root())
    );
}

#[tokio::test]
async fn lookups_by_hash_part_nar_hash_and_realisations_in_recorded_order() {
    let d = tempfile::tempdir().unwrap();
    let store = open(d.path()).await;
    let a = store.add_text("a", "a", &BTreeSet::new()).await.unwrap();
    let b = store.add_text("b", "b", &BTreeSet::new()).await.unwrap();
    let hash = |p: &str| store.store_dir().parse(p).unwrap().hash_part().to_string();
    assert_eq!(
        store.path_from_hash_part(&hash(&a)).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        store
            .path_from_hash_part("00000000000000000000000000000000")
            .await
            .unwrap(),
        None
    );
    let info = store.query_path_info(&b).await.unwrap().unwrap();
    assert_eq!(
        store.path_with_nar_hash(&info.nar_hash).await.unwrap(),
        Some(b.clone())
    );
    assert_eq!(store.path_with_nar_hash(&[0; 32]).await.unwrap(), None);

    // Realisations come back in the order they were recorded, after a cursor.
    let k1 = DrvOutput::new(DRV_PATH, "out");
    let k2 = DrvOutput::new(
        "/nix/store/q1qxcx8sbmi2zvx8dk4944x7hnlh4fly-other.drv",
        "out",
    );
    store.register_realisation(&k1, &a).await.unwrap();
    store.register_realisation(&k2, &b).await.unwrap();
    let (rows, max) = store.realisations_after(0, 10).await.unwrap();
    let keys: Vec<_> = rows
        .iter()
        .map(|(_, k, p)| (k.clone(), p.clone()))
        .collect();
    assert_eq!(keys, vec![(k1.clone(), a.clone()), (k2.clone(), b.clone())]);
    assert_eq!(max, rows[1].0);
    let (after_first, _) = store.realisations_after(rows[0].0, 10).await.unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].1, k2);
    let (limited, _) = store.realisations_after(0, 1).await.unwrap();
    assert_eq!(limited.len(), 1);
    // The newest row goes with its output (GC): the largest row id drops below a follower's
    // cursor, which is how it knows to step back.
    let cursor = max;
    let report = store.collect_garbage().await.unwrap();
    assert!(report.deleted.contains(&b), "{report:?}");
    let (_, max) = store.realisations_after(cursor, 10).await.unwrap();
    assert!(max < cursor, "max {max} cursor {cursor}");
}
