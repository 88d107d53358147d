//! The native executor (builds as Nix would, no Nix needed) behind the machine port.

use async_trait::async_trait;

use super::executor::{Built, ExecFailure, Executor, Job};
use crate::actors::types::Status;
use crate::builder::executor::Limits;
use crate::builder::executor::NativeExecutor;

#[async_trait]
impl Executor for NativeExecutor {
    async fn execute(&self, job: Job) -> Result<Built, ExecFailure> {
        // 0 is no limit, as in Nix and Hydra.
        let limit = |d: std::time::Duration| (!d.is_zero()).then_some(d);
        let limits = Limits {
            max_silent: limit(job.max_silent),
            timeout: limit(job.timeout),
            max_log_bytes: None,
        };
        match self
            .build_logged(&job.drv_path, &job.drv, limits, job.attempt)
            .await
        {
            Ok(r) => Ok(Built {
                outputs: r
                    .outputs
                    .into_iter()
                    .map(|(o, info)| (o, info.path))
                    .collect(),
                ran: r.ran,
            }),
            Err(e) => {
                // Keep the log tail with every failure that has one (some messages already end
                // with it), so "why did this fail" is answered without a shell on the builder.
                let mut message = e.to_string();
                let tail = e.log_tail();
                if !tail.is_empty() && !tail.iter().all(|l| message.contains(l.as_str())) {
                    message.push_str(&format!("; last {} log lines:", tail.len()));
                    for l in tail {
                        message.push_str("\n> ");
                        message.push_str(l);
                    }
                }
                Err(ExecFailure {
                    status: Status::from_code(e.status()).unwrap_or(Status::Failed),
                    message,
                    transient: e.is_transient(),
                })
            }
        }
    }
}
