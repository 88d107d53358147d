//! Checks every derivation format algorithm against what real Nix (2.8) produced: the fixtures in
//! `$QR_FIXTURES` (default `../shared/fixtures/nix-oracle`). Fails if the fixtures are missing.

mod common;

use std::collections::HashMap;

use qr::store::aterm;
use qr::store::derivation::{Derivation, DerivationOutput, derivations_from_show_json};
use qr::store::hash::to_hex;
use qr::store::hash_modulo::DrvHashes;
use qr::store::placeholder::{downstream_placeholder, hash_placeholder};
use qr::store::realisation::{DrvOutput, LegacyDrvOutput};
use qr::store::resolve::try_resolve;
use qr::store::{StoreDir, StorePath};
use serde_json::Value;

use common::{derivations, load_fixtures, s};

#[derive(Default, Debug)]
struct Counts {
    fixtures: usize,
    derivations: usize,
    drv_paths: usize,
    aterm_round_trips: usize,
    resolved_aterm_round_trips: usize,
    json_agreements: usize,
    json_imports: usize,
    json_documents: usize,
    hash_placeholders: usize,
    env_hash_placeholders: usize,
    interpolated: usize,
    hash_modulo_ids: usize,
    masked_matches: usize,
    unmasked_matches: usize,
    ia_output_paths: usize,
    fixed_output_paths: usize,
    deferred_outputs: usize,
    floating_outputs: usize,
    resolved_drvs: usize,
    resolved_output_paths: usize,
    resolution_predicates: usize,
}

struct Checker {
    failures: Vec<String>,
}

impl Checker {
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) -> bool {
        if got != want {
            self.failures
                .push(format!("{what}:\n   got: {got:?}\n  want: {want:?}"));
            false
        } else {
            true
        }
    }
}

fn store_path(sd: &StoreDir, p: &str) -> StorePath {
    sd.parse(p)
        .unwrap_or_else(|e| panic!("fixture path {p}: {e}"))
}

/// A fixture's realisations: (drv path, output) → out path.
fn realisation_map(fixture: &Value) -> HashMap<(String, String), String> {
    let mut m = HashMap::new();
    for (p, v) in derivations(fixture) {
        if let Some(rs) = v["realisations"].as_object() {
            for (o, r) in rs {
                m.insert((p.to_string(), o.clone()), s(r, "/out_path").to_string());
            }
        }
    }
    m
}

#[test]
fn every_fixture_matches_nix() {
    let mut c = Counts::default();
    let mut ck = Checker {
        failures: Vec::new(),
    };
    for (fname, fx) in load_fixtures() {
        c.fixtures += 1;
        let sd = StoreDir::new(s(&fx, "/store_dir")).expect("store dir");

        for (o, want) in fx["hash_placeholders"]
            .as_object()
            .expect("hash_placeholders")
        {
            ck.eq(
                &format!("{fname}: hash_placeholder({o})"),
                hash_placeholder(o),
                want.as_str().unwrap_or_default().to_string(),
            );
            c.hash_placeholders += 1;
        }

        // Parse every derivation first: the loader for hash modulo reads from this map.
        let mut parsed: HashMap<String, Derivation> = HashMap::new();
        for (p, v) in derivations(&fx) {
            let sp = store_path(&sd, p);
            match aterm::parse_named(s(v, "/aterm").as_bytes(), sp.drv_name()) {
                Ok(d) => {
                    parsed.insert(p.to_string(), d);
                }
                Err(e) => ck.failures.push(format!("{fname}: {p}: parse: {e}")),
            }
        }
        let loader_map = parsed.clone();
        let mut load = |p: &str| -> Result<Derivation, String> {
            loader_map
                .get(p)
                .cloned()
                .ok_or_else(|| format!("{p} not in fixture"))
        };
        let mut hashes = DrvHashes::new(sd.clone());
        let reals = realisation_map(&fx);

        // The whole graph as one `derivation show` document without output paths.
        let mut doc = serde_json::Map::new();
        for (p, v) in derivations(&fx) {
            let mut show = v["show_derivation"].clone();
            let outs: Vec<String> = show["outputs"]
                .as_object()
                .expect("outputs")
                .keys()
                .cloned()
                .collect();
            for o in outs {
                if show["outputs"][&o]
                    .as_object_mut()
                    .expect("output")
                    .remove("path")
                    .is_some()
                {
                    show["env"].as_object_mut().expect("env").remove(&o);
                }
            }
            doc.insert(p.to_string(), show);
        }
        let mut no_external =
            |p: &str| -> Result<Derivation, String> { Err(format!("{p} not in document")) };
        match derivations_from_show_json(
            &Value::Object(doc),
            &mut DrvHashes::new(sd.clone()),
            &mut no_external,
        ) {
            Ok(list) => {
                let mut seen = std::collections::HashSet::new();
                for (path, d) in &list {
                    let key = sd.print(path);
                    for input in d.input_drvs.keys() {
                        ck.eq(
                            &format!("{fname}: {key}: input {input} imported first"),
                            seen.contains(input),
                            true,
                        );
                    }
                    ck.eq(
                        &format!("{fname}: imported {key}"),
                        Some(d),
                        parsed.get(&key),
                    );
                    seen.insert(key);
                }
                if ck.eq(&format!("{fname}: document size"), list.len(), parsed.len()) {
                    c.json_documents += 1;
                }
            }
            Err(e) => ck.failures.push(format!("{fname}: document import: {e}")),
        }

        for (p, v) in derivations(&fx) {
            let Some(drv) = parsed.get(p) else { continue };
            c.derivations += 1;
            let sp = store_path(&sd, p);
            let at = format!("{fname}: {p}");

            // ATerm round trip and drv path.
            if ck.eq(
                &format!("{at}: ATerm round trip"),
                drv.to_aterm().as_str(),
                s(v, "/aterm"),
            ) {
                c.aterm_round_trips += 1;
            }
            let dp = drv.drv_path(&sd).map(|x| sd.print(&x));
            if ck.eq(&format!("{at}: drv path"), dp, Ok(p.to_string())) {
                c.drv_paths += 1;
            }

            // ATerm ↔ `derivation show` JSON.
            let show = &v["show_derivation"];
            if ck.eq(&format!("{at}: show JSON"), &drv.to_show_json(), show) {
                c.json_agreements += 1;
            }
            match Derivation::from_show_json(show, Some(sp.drv_name()), &sd) {
                Ok(d) => {
                    ck.eq(&format!("{at}: from show JSON"), &d, drv);
                }
                Err(e) => ck.failures.push(format!("{at}: from show JSON: {e}")),
            }
            // The same JSON with every output path (and output env var) removed: paths must be
            // computed back (fixed from the hash, IA from the modulo hash, deferred stay so).
            let mut stripped = show.clone();
            for (o, out) in &drv.outputs {
                stripped["outputs"][o]
                    .as_object_mut()
                    .expect("output")
                    .remove("path");
                if out.path().is_some() {
                    stripped["env"].as_object_mut().expect("env").remove(o);
                }
            }
            match Derivation::from_show_json(&stripped, None, &sd) {
                Ok(mut d) => match hashes.fill_input_addressed_paths(&mut d, &mut load) {
                    Ok(()) => {
                        if ck.eq(&format!("{at}: JSON import without paths"), &d, drv) {
                            c.json_imports += 1;
                        }
                    }
                    Err(e) => ck.failures.push(format!("{at}: fill paths: {e}")),
                },
                Err(e) => ck.failures.push(format!("{at}: stripped JSON: {e}")),
            }

            // Placeholders: a floating output's own env var, and what dependents interpolate.
            for (o, out) in &drv.outputs {
                if matches!(out, DerivationOutput::CaFloating { .. }) {
                    ck.eq(
                        &format!("{at}: env[{o}] placeholder"),
                        drv.env.get(o).cloned(),
                        Some(hash_placeholder(o)),
                    );
                    c.env_hash_placeholders += 1;
                }
                let want = s(v, &format!("/interpolated/{o}"));
                let got = match out.path() {
                    Some(path) => path.to_string(),
                    None => downstream_placeholder(&sp, o),
                };
                if ck.eq(&format!("{at}: interpolated {o}"), got.as_str(), want) {
                    c.interpolated += 1;
                }
            }

            // hashModulo = realisation ids (masked), and which variant matches.
            let masked = hashes.hash_derivation(drv, true, &mut load);
            let unmasked = hashes.hash_derivation(drv, false, &mut load);
            let (masked, unmasked) = match (masked, unmasked) {
                (Ok(m), Ok(u)) => (m, u),
                (m, u) => {
                    ck.failures
                        .push(format!("{at}: hash modulo: {:?} / {:?}", m.err(), u.err()));
                    continue;
                }
            };
            let by_path = hashes.path_hash(p, &mut load).ok().cloned();
            ck.eq(
                &format!("{at}: path hash = unmasked"),
                by_path.as_ref(),
                Some(&unmasked),
            );
            ck.eq(
                &format!("{at}: memoised"),
                hashes.cached(p),
                Some(&unmasked),
            );
            for (o, r) in v["realisations"].as_object().expect("realisations") {
                let id = s(r, "/id");
                let Some(mh) = masked.output(o) else {
                    ck.failures.push(format!("{at}: no modulo hash for {o}"));
                    continue;
                };
                let got = DrvOutput::new(p, o.as_str()).nix_legacy_id(mh);
                if got == id {
                    c.masked_matches += 1;
                }
                if unmasked
                    .output(o)
                    .map(|h| format!("sha256:{}!{o}", to_hex(h)))
                    .as_deref()
                    == Some(id)
                {
                    c.unmasked_matches += 1;
                }
                if ck.eq(&format!("{at}: realisation id {o}"), got.as_str(), id) {
                    c.hash_modulo_ids += 1;
                }
                ck.eq(
                    &format!("{at}: drv_hash_modulo {o}"),
                    format!("sha256:{}", to_hex(mh)),
                    s(r, "/drv_hash_modulo").to_string(),
                );
                let parsed_id: Result<LegacyDrvOutput, _> = id.parse();
                ck.eq(
                    &format!("{at}: parse id {o}"),
                    parsed_id.ok().map(|l| l.drv_hash),
                    Some(*mh),
                );
            }

            // Output paths computed the way Nix does.
            match hashes.output_paths(drv, &mut load) {
                Ok(paths) => {
                    for (o, out) in &drv.outputs {
                        let got = paths.get(o).cloned().flatten().map(|p| sd.print(&p));
                        let want = show
                            .pointer(&format!("/outputs/{o}/path"))
                            .and_then(Value::as_str)
                            .map(str::to_string);
                        ck.eq(
                            &format!("{at}: ATerm path {o}"),
                            out.path().map(str::to_string),
                            want.clone(),
                        );
                        if ck.eq(&format!("{at}: output path {o}"), got, want) {
                            match out {
                                DerivationOutput::InputAddressed { .. } => c.ia_output_paths += 1,
                                DerivationOutput::CaFixed { .. } => c.fixed_output_paths += 1,
                                DerivationOutput::Deferred => c.deferred_outputs += 1,
                                DerivationOutput::CaFloating { .. } => c.floating_outputs += 1,
                            }
                        }
                    }
                    ck.eq(
                        &format!("{at}: deferred iff modulo hash deferred"),
                        drv.has_deferred_outputs(),
                        masked.is_deferred() && !drv.is_ca_floating(),
                    );
                }
                Err(e) => ck.failures.push(format!("{at}: output paths: {e}")),
            }

            // Resolution.
            let resolved = &v["resolved"];
            if ck.eq(
                &format!("{at}: needs resolution"),
                drv.needs_resolution(),
                !resolved.is_null(),
            ) {
                c.resolution_predicates += 1;
            }
            if resolved.is_null() {
                continue;
            }
            ck.eq(
                &format!("{at}: resolutions map"),
                fx["resolutions"][p].as_str(),
                resolved["drv_path"].as_str(),
            );
            let want_aterm = s(resolved, "/aterm");
            match aterm::parse(want_aterm.as_bytes()) {
                Ok(rd) => {
                    if ck.eq(
                        &format!("{at}: resolved ATerm round trip"),
                        rd.to_aterm().as_str(),
                        want_aterm,
                    ) {
                        c.resolved_aterm_round_trips += 1;
                    }
                    ck.eq(
                        &format!("{at}: resolved show JSON"),
                        &rd.to_show_json(),
                        &resolved["show_derivation"],
                    );
                }
                Err(e) => ck.failures.push(format!("{at}: resolved parse: {e}")),
            }
            match try_resolve(drv, &sd, |ip, o| {
                reals.get(&(ip.to_string(), o.to_string())).cloned()
            }) {
                Ok(r) => {
                    let a = ck.eq(
                        &format!("{at}: resolved ATerm"),
                        r.to_aterm().as_str(),
                        want_aterm,
                    );
                    let rp = r.drv_path(&sd).map(|x| sd.print(&x)).ok();
                    let b = ck.eq(
                        &format!("{at}: resolved drv path"),
                        rp.as_deref(),
                        resolved["drv_path"].as_str(),
                    );
                    if a && b {
                        c.resolved_drvs += 1;
                    }
                    ck.eq(
                        &format!("{at}: resolved needs no resolution"),
                        r.needs_resolution(),
                        false,
                    );
                    // The resolved drv's realisation ids (masked modulo hash of the resolved drv)
                    // and its output paths (IA for formerly deferred outputs).
                    let rh = hashes.hash_derivation(&r, true, &mut load);
                    match rh {
                        Ok(rh) => {
                            for (o, rr) in resolved["realisations"]
                                .as_object()
                                .expect("resolved realisations")
                            {
                                let got = rh.output(o).map(|h| format!("sha256:{}!{o}", to_hex(h)));
                                if ck.eq(
                                    &format!("{at}: resolved realisation id {o}"),
                                    got.as_deref(),
                                    rr["id"].as_str(),
                                ) {
                                    c.hash_modulo_ids += 1;
                                    c.masked_matches += 1;
                                }
                                if let Some(path) = r.outputs.get(o).and_then(|x| x.path()) {
                                    if ck.eq(
                                        &format!("{at}: resolved output path {o}"),
                                        Some(path),
                                        rr["out_path"].as_str(),
                                    ) {
                                        c.resolved_output_paths += 1;
                                    }
                                    ck.eq(
                                        &format!(
                                            "{at}: original realisation = resolved output path {o}"
                                        ),
                                        v.pointer(&format!("/realisations/{o}/out_path"))
                                            .and_then(Value::as_str),
                                        Some(path),
                                    );
                                }
                            }
                        }
                        Err(e) => ck.failures.push(format!("{at}: resolved hash: {e}")),
                    }
                }
                Err(e) => ck.failures.push(format!("{at}: resolve: {e}")),
            }
            // Leaving any realisation out must fail and name it.
            for (ip, outs) in &drv.input_drvs {
                for o in outs {
                    let e = try_resolve(drv, &sd, |p2, o2| {
                        if p2 == ip && o2 == o {
                            None
                        } else {
                            reals.get(&(p2.to_string(), o2.to_string())).cloned()
                        }
                    });
                    let msg = e.err().map(|e| e.to_string());
                    ck.eq(
                        &format!("{at}: missing {ip}^{o}"),
                        msg,
                        Some(format!("no realisation for {ip}^{o}")),
                    );
                }
            }
        }
    }

    eprintln!("nix oracle checks: {c:#?}");
    eprintln!(
        "realisation ids: masked modulo hash matched {}/{}, unmasked matched {}/{}",
        c.masked_matches, c.hash_modulo_ids, c.unmasked_matches, c.hash_modulo_ids
    );
    assert!(
        ck.failures.is_empty(),
        "{} mismatches with Nix:\n{}",
        ck.failures.len(),
        ck.failures.join("\n")
    );
    for (what, n) in [
        ("fixtures", c.fixtures),
        ("derivations", c.derivations),
        ("drv paths", c.drv_paths),
        ("ATerm round trips", c.aterm_round_trips),
        ("resolved ATerm round trips", c.resolved_aterm_round_trips),
        ("JSON agreements", c.json_agreements),
        ("JSON imports", c.json_imports),
        ("JSON documents", c.json_documents),
        ("hash placeholders", c.hash_placeholders),
        ("env hash placeholders", c.env_hash_placeholders),
        ("interpolated", c.interpolated),
        ("hash modulo ids", c.hash_modulo_ids),
        ("IA output paths", c.ia_output_paths),
        ("fixed output paths", c.fixed_output_paths),
        ("deferred outputs", c.deferred_outputs),
        ("floating outputs", c.floating_outputs),
        ("resolved drvs", c.resolved_drvs),
        ("resolved output paths", c.resolved_output_paths),
        ("resolution predicates", c.resolution_predicates),
    ] {
        assert!(n > 0, "nothing checked for {what}");
    }
    assert_eq!(c.derivations, c.drv_paths);
    assert_eq!(c.derivations, c.aterm_round_trips);
    assert_eq!(
        c.masked_matches, c.hash_modulo_ids,
        "realisation ids use the masked hash"
    );
}
