//! A builder session's I/O: each function returns the event its answer is.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::jobs::OutputCheck;
use super::references_first;
use super::remote_core::{In, Order};
use crate::actors::types::Outputs;
use crate::store::{Derivation, LocalStore, PathInfo, Store, StoreError};

/// The derivation of a job that came without one.
pub async fn read_drv<S>(store: Arc<LocalStore>, order: Order<S>) -> In<S> {
    let drv = store
        .read_derivation(&order.drv_path)
        .await
        .map(Arc::new)
        .map_err(|e| e.to_string());
    In::DrvRead { order, drv }
}

/// What the builder needs: the drv's closure (its sources, and for a drv with input drvs those
/// drvs, so the builder can read their output paths) and the input drvs' outputs, references
/// first.
pub async fn list_inputs<S>(
    store: Arc<LocalStore>,
    job_id: String,
    order: Order<S>,
    drv: Arc<Derivation>,
) -> In<S> {
    let inputs = closure_of(&store, &order.drv_path, &drv)
        .await
        .map_err(|e| e.to_string());
    In::Inputs {
        job_id,
        order,
        drv,
        inputs,
    }
}

async fn closure_of(
    store: &LocalStore,
    drv_path: &str,
    drv: &Derivation,
) -> Result<Vec<PathInfo>, StoreError> {
    let mut roots: Vec<String> = drv.input_srcs.iter().cloned().collect();
    if store.is_valid_path(drv_path).await? {
        roots.push(drv_path.to_string());
    }
    for (input, wanted) in &drv.input_drvs {
        let idrv = store.read_derivation(input).await?;
        for o in wanted {
            if let Some(p) = idrv.outputs.get(o).and_then(|x| x.path()) {
                roots.push(p.to_string());
            }
        }
    }
    let closure = store.closure(roots.iter().map(String::as_str)).await?;
    let mut infos = Vec::with_capacity(closure.len());
    for p in &closure {
        match store.query_path_info(p).await? {
            Some(i) => infos.push(i),
            None => return Err(StoreError::NotValid(p.to_string())),
        }
    }
    Ok(references_first(infos))
}

/// Outputs the builder said the runner has already: each must be valid here with the claimed
/// NAR hash and size.
pub async fn verify<S>(
    store: Arc<LocalStore>,
    job_id: String,
    drv_path: String,
    ran: bool,
    outputs: Outputs,
    checks: BTreeMap<String, OutputCheck>,
) -> In<S> {
    let result = verify_in_store(&store, &checks).await;
    In::Verified {
        job_id,
        drv_path,
        ran,
        outputs,
        result,
    }
}

async fn verify_in_store(
    store: &LocalStore,
    checks: &BTreeMap<String, OutputCheck>,
) -> Result<(), String> {
    for (name, c) in checks {
        if let OutputCheck::InStore(claimed) = c {
            match store.query_path_info(&claimed.path).await {
                Ok(Some(have))
                    if have.nar_hash == claimed.nar_hash && have.nar_size == claimed.nar_size => {}
                Ok(Some(_)) => {
                    return Err(format!(
                        "output {name} ({}) differs from the runner's copy",
                        claimed.path
                    ));
                }
                Ok(None) => {
                    return Err(format!(
                        "output {name} ({}) was neither uploaded nor valid on the runner",
                        claimed.path
                    ));
                }
                Err(e) => return Err(format!("checking {}: {e}", claimed.path)),
            }
        }
    }
    Ok(())
}
