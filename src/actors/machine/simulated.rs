//! A simulated builder that takes no time: outputs are computed, not built (the benchmarks' way to
//! measure the scheduler itself). Each output is one small file naming the drv and the output, so
//! the same drv always "builds" to the same output; a floating CA output gets the path and `ca` its
//! content gives (as a real builder's would), so a runner that checks uploads (`qr builder
//! --executor simulated`, `qr bench --remote-builders`) accepts it.

use std::sync::Arc;

use async_trait::async_trait;

use super::executor::{Built, ExecFailure, Executor, Job};
use crate::actors::types::{Outputs, Status};
use crate::store::ca_output::ca_string;
use crate::store::hash::{render_nix32, sha256};
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
    async fn register(
        &self,
        path: &str,
        nar: Vec<u8>,
        ca: Option<String>,
        drv_path: &str,
    ) -> Result<(), ExecFailure> {
        if self.store.is_valid_path(path).await.unwrap_or(false) {
            return Ok(());
        }
        let info = PathInfo {
            path: path.to_string(),
            nar_hash: sha256(&nar),
            nar_size: nar.len() as u64,
            references: Default::default(),
            ca,
            deriver: Some(drv_path.to_string()),
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.import_nar(&info, &mut nar.as_slice()))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))
    }
}

fn fail(m: String) -> ExecFailure {
    ExecFailure {
        status: Status::Failed,
        message: m,
        transient: true,
    }
}

#[async_trait]
impl Executor for SimulatedExecutor {
    async fn execute(&self, job: Job) -> Result<Built, ExecFailure> {
        let mut outputs = Outputs::new();
        for (name, out) in &job.drv.outputs {
            // No store path in the content: it refers to nothing.
            let content = format!("simulated output {name} of {}\n", job.drv.name);
            let seed = sha256(job.drv_path.as_bytes());
            let content = format!("{content}{}\n", render_nix32(&seed));
            let nar = NarTree::file(content.into_bytes())
                .to_nar()
                .map_err(|e| fail(e.to_string()))?;
            let (path, ca) = match out.path() {
                Some(p) => (p.to_string(), None),
                None => {
                    // No self-reference: the hash modulo the path's own hash part is the NAR's.
                    let h = sha256(&nar);
                    let p = self.store_dir.make_source_path(
                        &output_path_name(&job.drv.name, name),
                        &h,
                        [],
                        false,
                    );
                    (self.store_dir.print(&p), Some(ca_string(&h)))
                }
            };
            self.register(&path, nar, ca, &job.drv_path).await?;
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
