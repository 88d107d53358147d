//! A simulated builder that takes no time: outputs are computed, not built (the benchmarks' way to
//! measure the scheduler itself). Floating CA outputs get a path derived from the drv path, so the
//! same drv always "builds" to the same output.

use async_trait::async_trait;

use super::executor::{ExecFailure, Executor, Job};
use crate::actors::types::{Outputs, Status};
use crate::store::hash::sha256;
use crate::store::path::{StoreDir, output_path_name};

pub struct SimulatedExecutor {
    store_dir: StoreDir,
}

impl SimulatedExecutor {
    pub fn new(store_dir: StoreDir) -> Self {
        SimulatedExecutor { store_dir }
    }
}

#[async_trait]
impl Executor for SimulatedExecutor {
    async fn execute(&self, job: Job) -> Result<Outputs, ExecFailure> {
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
            outputs.insert(name.clone(), path);
        }
        if outputs.is_empty() {
            return Err(ExecFailure {
                status: Status::Failed,
                message: "derivation has no outputs".into(),
                transient: false,
            });
        }
        Ok(outputs)
    }
}
