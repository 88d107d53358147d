//! A simulated builder that takes no time: outputs are computed, not built (the benchmarks' way to
//! measure the scheduler itself). Floating CA outputs get a path derived from the drv path, so the
//! same drv always "builds" to the same output.

use std::sync::Arc;

use async_trait::async_trait;

use super::executor::{Built, ExecFailure, Executor, Job};
use crate::actors::types::{Outputs, Status};
use crate::store::hash::sha256;
use crate::store::nar::NarTree;
use crate::store::path::{StoreDir, output_path_name};
use crate::store::{PathInfo, Store};

pub struct SimulatedExecutor {
    store_dir: StoreDir,
    store: Arc<dyn Store>,
}

impl SimulatedExecutor {
    pub fn new(store: Arc<dyn Store>) -> Self {
        SimulatedExecutor {
            store_dir: store.store_dir().clone(),
            store,
        }
    }

    /// Registers a one-file output (so dependents can be resolved against valid paths).
    async fn register(&self, path: &str, drv_path: &str) -> Result<(), ExecFailure> {
        if self.store.is_valid_path(path).await.unwrap_or(false) {
            return Ok(());
        }
        let fail = |m: String| ExecFailure {
            status: Status::Failed,
            message: m,
            transient: true,
        };
        let nar = NarTree::file(format!("simulated output of {drv_path}\n").into_bytes())
            .to_nar()
            .map_err(|e| fail(e.to_string()))?;
        let info = PathInfo {
            path: path.to_string(),
            nar_hash: sha256(&nar),
            nar_size: nar.len() as u64,
            references: Default::default(),
            ca: None,
            deriver: Some(drv_path.to_string()),
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.import_nar(&info, &mut nar.as_slice()))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))
    }
}

#[async_trait]
impl Executor for SimulatedExecutor {
    async fn execute(&self, job: Job) -> Result<Built, ExecFailure> {
        let mut outputs = Outputs::new();
        for (name, out) in &job.drv.outputs {
            let path = match out.path() {
                Some(p) => p.to_string(),
                None => {
                    let h = sha256(format!("{}!{name}", job.drv_path).as_bytes());
                    let p = self.store_dir.make_source_path(
                        &output_path_name(&job.drv.name, name),
                        &h,
                        [],
                        false,
                    );
                    self.store_dir.print(&p)
                }
            };
            self.register(&path, &job.drv_path).await?;
            outputs.insert(name.clone(), path);
        }
        if outputs.is_empty() {
            return Err(ExecFailure {
                status: Status::Failed,
                message: "derivation has no outputs".into(),
                transient: false,
            });
        }
        Ok(Built { outputs, ran: true })
    }
}
