//! Whether a drv is built already: its outputs valid in the store (static paths, or realisations
//! from the database, then the store, for floating and deferred outputs).

use std::collections::HashMap;

use crate::actors::env::Env;
use crate::actors::types::Outputs;
use crate::store::Derivation;

/// The outputs of `drv` if every one is valid: static paths for input-addressed and fixed outputs,
/// realisations (database, then store) for floating and deferred ones.
pub async fn built_outputs(env: &Env, drv_path: &str, drv: &Derivation) -> Option<Outputs> {
    let mut outputs = Outputs::new();
    for (name, out) in &drv.outputs {
        let path = match out.path() {
            Some(p) => p.to_string(),
            None => match env.db.realisation(drv_path, name).await {
                Ok(Some(r)) => r.out_path,
                _ => env
                    .store
                    .query_realisation(&crate::store::DrvOutput::new(drv_path, name))
                    .await
                    .ok()??,
            },
        };
        if !env.store.is_valid_path(&path).await.ok()? {
            return None;
        }
        outputs.insert(name.clone(), path);
    }
    Some(outputs)
}

/// [`built_outputs`] for many drvs: realisations (database, then store) and validity in batches.
pub async fn built_outputs_many(
    env: &Env,
    drvs: &[(String, Derivation)],
) -> HashMap<String, Outputs> {
    let floating: Vec<String> = drvs
        .iter()
        .filter(|(_, d)| d.outputs.values().any(|o| o.path().is_none()))
        .map(|(p, _)| p.clone())
        .collect();
    let mut realised: HashMap<(String, String), String> = HashMap::new();
    if !floating.is_empty() {
        if let Ok(rs) = env.db.realisations_for_drvs(&floating).await {
            for r in rs {
                realised.insert((r.drv_path, r.output_name), r.out_path);
            }
        }
        let missing: Vec<crate::store::DrvOutput> = drvs
            .iter()
            .flat_map(|(p, d)| {
                d.outputs
                    .iter()
                    .filter(|(_, o)| o.path().is_none())
                    .map(move |(name, _)| (p, name))
            })
            .filter(|(p, name)| !realised.contains_key(&((*p).clone(), (*name).clone())))
            .map(|(p, name)| crate::store::DrvOutput::new(p.clone(), name.clone()))
            .collect();
        if !missing.is_empty()
            && let Ok(rs) = env.store.query_realisations(&missing).await
        {
            for (k, path) in rs {
                realised.insert((k.drv_path, k.output), path);
            }
        }
    }
    let mut candidates: Vec<(&String, Outputs)> = Vec::new();
    for (p, d) in drvs {
        let mut outputs = Outputs::new();
        let complete = d.outputs.iter().all(|(name, out)| {
            let path = match out.path() {
                Some(s) => Some(s.to_string()),
                None => realised.get(&(p.clone(), name.clone())).cloned(),
            };
            path.map(|s| outputs.insert(name.clone(), s)).is_some()
        });
        if complete {
            candidates.push((p, outputs));
        }
    }
    let paths: Vec<String> = candidates
        .iter()
        .flat_map(|(_, o)| o.values().cloned())
        .collect();
    let valid = match env.store.valid_among(&paths).await {
        Ok(v) => v,
        Err(_) => return HashMap::new(),
    };
    candidates
        .into_iter()
        .filter(|(_, o)| o.values().all(|p| valid.contains(p)))
        .map(|(p, o)| (p.clone(), o))
        .collect()
}
