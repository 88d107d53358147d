//! The jobs a remote builder was given, as a plain state machine: what each job may upload and
//! report. The remote machine actor holds one table per session and refuses anything that does
//! not fit it (a job it did not give, a path that is not one of the job's outputs, a result that
//! does not match what was uploaded).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::store::path::output_path_name;
use crate::store::{Derivation, DerivationOutput, PathInfo, StoreDir};

/// What an output's path must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// Input-addressed or fixed: this exact path.
    Static(String),
    /// Floating content-addressed: a path with this name, whose hash the content decides.
    Floating { name: String },
}

/// One job given to the builder.
#[derive(Debug, Clone)]
pub struct Job<T> {
    pub id: String,
    pub drv_path: String,
    pub outputs: BTreeMap<String, Expected>,
    /// The closure of the job's inputs (what outputs may refer to, besides each other).
    pub inputs: BTreeSet<String>,
    /// Outputs uploaded so far: name → info.
    pub uploaded: BTreeMap<String, PathInfo>,
    pub payload: T,
}

/// Why something a builder sent is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    UnknownJob(String),
    NotAnOutput {
        job: String,
        output: String,
    },
    WrongPath {
        job: String,
        output: String,
        path: String,
        expected: String,
    },
    NotContentAddressed {
        job: String,
        output: String,
    },
    OutputsDiffer {
        job: String,
        got: Vec<String>,
        want: Vec<String>,
    },
    UploadDiffers {
        job: String,
        output: String,
    },
    Content(String),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::UnknownJob(j) => write!(f, "job {j} was not given to this builder"),
            Violation::NotAnOutput { job, output } => {
                write!(f, "job {job} has no output {output:?}")
            }
            Violation::WrongPath {
                job,
                output,
                path,
                expected,
            } => write!(
                f,
                "job {job}: output {output:?} at {path}, expected {expected}"
            ),
            Violation::NotContentAddressed { job, output } => write!(
                f,
                "job {job}: floating output {output:?} comes without its content address"
            ),
            Violation::OutputsDiffer { job, got, want } => {
                write!(f, "job {job}: reported outputs {got:?}, expected {want:?}")
            }
            Violation::UploadDiffers { job, output } => write!(
                f,
                "job {job}: the result for output {output:?} differs from what was uploaded"
            ),
            Violation::Content(m) => f.write_str(m),
        }
    }
}

/// What an output of a result needs before it is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputCheck {
    /// Uploaded (and verified) in this job.
    Uploaded,
    /// Not uploaded: it must already be valid in the runner's store with this info.
    InStore(PathInfo),
}

/// The jobs of one session.
#[derive(Debug)]
pub struct JobTable<T> {
    store_dir: StoreDir,
    prefix: String,
    next: u64,
    jobs: BTreeMap<String, Job<T>>,
}

/// The paths a derivation's outputs must have.
pub fn expected_outputs(drv: &Derivation) -> BTreeMap<String, Expected> {
    drv.outputs
        .iter()
        .map(|(name, out)| {
            let e = match out {
                DerivationOutput::InputAddressed { path }
                | DerivationOutput::CaFixed { path, .. } => Expected::Static(path.clone()),
                _ => Expected::Floating {
                    name: output_path_name(&drv.name, name),
                },
            };
            (name.clone(), e)
        })
        .collect()
}

impl<T> JobTable<T> {
    /// `prefix` makes job ids unique across sessions and runner restarts.
    pub fn new(store_dir: StoreDir, prefix: impl Into<String>) -> Self {
        JobTable {
            store_dir,
            prefix: prefix.into(),
            next: 0,
            jobs: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Job<T>> {
        self.jobs.get(id)
    }

    /// The job for `drv_path`, if one is in flight.
    pub fn by_drv(&self, drv_path: &str) -> Option<&Job<T>> {
        self.jobs.values().find(|j| j.drv_path == drv_path)
    }

    /// Gives a job; returns its id.
    pub fn add(
        &mut self,
        drv_path: &str,
        drv: &Derivation,
        inputs: BTreeSet<String>,
        payload: T,
    ) -> String {
        self.next += 1;
        let id = format!("{}-{}", self.prefix, self.next);
        self.jobs.insert(
            id.clone(),
            Job {
                id: id.clone(),
                drv_path: drv_path.to_string(),
                outputs: expected_outputs(drv),
                inputs,
                uploaded: BTreeMap::new(),
                payload,
            },
        );
        id
    }

    fn check_path(
        &self,
        job: &Job<T>,
        output: &str,
        info: &PathInfo,
    ) -> Result<Expected, Violation> {
        let e = job
            .outputs
            .get(output)
            .ok_or_else(|| Violation::NotAnOutput {
                job: job.id.clone(),
                output: output.to_string(),
            })?;
        let wrong = |expected: String| Violation::WrongPath {
            job: job.id.clone(),
            output: output.to_string(),
            path: info.path.clone(),
            expected,
        };
        match e {
            Expected::Static(p) if *p != info.path => return Err(wrong(p.clone())),
            Expected::Static(_) => {}
            Expected::Floating { name } => {
                let ok = self
                    .store_dir
                    .parse(&info.path)
                    .is_ok_and(|sp| sp.name() == name);
                if !ok {
                    return Err(wrong(format!("a path named {name} in {}", self.store_dir)));
                }
                if !info
                    .ca
                    .as_deref()
                    .is_some_and(|c| c.starts_with("fixed:r:sha256:"))
                {
                    return Err(Violation::NotContentAddressed {
                        job: job.id.clone(),
                        output: output.to_string(),
                    });
                }
            }
        }
        Ok(e.clone())
    }

    /// May this job upload `info` as `output`? Returns what the path must be.
    pub fn check_upload(
        &self,
        job_id: &str,
        output: &str,
        info: &PathInfo,
    ) -> Result<Expected, Violation> {
        let job = self
            .jobs
            .get(job_id)
            .ok_or_else(|| Violation::UnknownJob(job_id.to_string()))?;
        self.check_path(job, output, info)
    }

    /// Sets the input closure of a job (known once the runner listed it).
    pub fn set_inputs(&mut self, job_id: &str, inputs: BTreeSet<String>) {
        if let Some(j) = self.jobs.get_mut(job_id) {
            j.inputs = inputs;
        }
    }

    /// Records a verified, registered upload.
    pub fn uploaded(&mut self, job_id: &str, output: &str, info: PathInfo) {
        if let Some(j) = self.jobs.get_mut(job_id) {
            j.uploaded.insert(output.to_string(), info);
        }
    }

    /// Checks a reported success: the job is ours, it reports exactly the drv's outputs, each at an
    /// acceptable path, and matching what was uploaded. Returns, per output, what the store must
    /// confirm.
    pub fn check_result(
        &self,
        job_id: &str,
        outputs: &BTreeMap<String, PathInfo>,
    ) -> Result<BTreeMap<String, OutputCheck>, Violation> {
        let job = self
            .jobs
            .get(job_id)
            .ok_or_else(|| Violation::UnknownJob(job_id.to_string()))?;
        let got: Vec<String> = outputs.keys().cloned().collect();
        let want: Vec<String> = job.outputs.keys().cloned().collect();
        if got != want {
            return Err(Violation::OutputsDiffer {
                job: job_id.to_string(),
                got,
                want,
            });
        }
        let mut checks = BTreeMap::new();
        for (name, info) in outputs {
            self.check_path(job, name, info)?;
            let c = match job.uploaded.get(name) {
                Some(u) if u == info || same_content(u, info) => OutputCheck::Uploaded,
                Some(_) => {
                    return Err(Violation::UploadDiffers {
                        job: job_id.to_string(),
                        output: name.clone(),
                    });
                }
                None => OutputCheck::InStore(info.clone()),
            };
            checks.insert(name.clone(), c);
        }
        Ok(checks)
    }

    /// Removes a job (finished, failed or aborted).
    pub fn take(&mut self, job_id: &str) -> Option<Job<T>> {
        self.jobs.remove(job_id)
    }

    /// Removes every job (the session ended).
    pub fn drain(&mut self) -> Vec<Job<T>> {
        std::mem::take(&mut self.jobs).into_values().collect()
    }

    /// Drv paths of the jobs in flight.
    pub fn drvs(&self) -> BTreeSet<String> {
        self.jobs.values().map(|j| j.drv_path.clone()).collect()
    }
}

/// Same path, hash, size and references (the deriver and ca may be filled in differently).
fn same_content(a: &PathInfo, b: &PathInfo) -> bool {
    a.path == b.path
        && a.nar_hash == b.nar_hash
        && a.nar_size == b.nar_size
        && a.references == b.references
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DerivationOutput;

    fn drv() -> Derivation {
        let mut d = Derivation {
            name: "hello".into(),
            system: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            ..Default::default()
        };
        d.outputs.insert(
            "out".into(),
            DerivationOutput::CaFloating {
                method_algo: "r:sha256".into(),
            },
        );
        d.outputs.insert(
            "doc".into(),
            DerivationOutput::InputAddressed {
                path: "/s/dddddddddddddddddddddddddddddddd-hello-doc".into(),
            },
        );
        d
    }

    fn info(path: &str, ca: Option<&str>) -> PathInfo {
        PathInfo {
            path: path.into(),
            nar_hash: [1; 32],
            nar_size: 8,
            references: Default::default(),
            ca: ca.map(str::to_string),
            deriver: None,
        }
    }

    const CA: &str = "/s/cccccccccccccccccccccccccccccccc-hello";
    const DOC: &str = "/s/dddddddddddddddddddddddddddddddd-hello-doc";

    fn table() -> (JobTable<()>, String) {
        let mut t = JobTable::new(StoreDir::new("/s").unwrap(), "r1");
        let id = t.add("/s/x-hello.drv", &drv(), Default::default(), ());
        (t, id)
    }

    #[test]
    fn uploads_must_belong_to_a_given_job_and_output() {
        let (t, id) = table();
        assert_eq!(id, "r1-1");
        let ca = info(CA, Some("fixed:r:sha256:abc"));
        assert!(t.check_upload(&id, "out", &ca).is_ok());
        assert_eq!(
            t.check_upload("r1-9", "out", &ca),
            Err(Violation::UnknownJob("r1-9".into()))
        );
        assert!(matches!(
            t.check_upload(&id, "bin", &ca),
            Err(Violation::NotAnOutput { .. })
        ));
        // an input-addressed output at another path
        assert!(matches!(
            t.check_upload(&id, "doc", &ca),
            Err(Violation::WrongPath { .. })
        ));
        // a floating output with another name, or without its content address
        let other = info(
            "/s/cccccccccccccccccccccccccccccccc-other",
            Some("fixed:r:sha256:abc"),
        );
        assert!(matches!(
            t.check_upload(&id, "out", &other),
            Err(Violation::WrongPath { .. })
        ));
        assert!(matches!(
            t.check_upload(&id, "out", &info(CA, None)),
            Err(Violation::NotContentAddressed { .. })
        ));
    }

    #[test]
    fn results_must_match_the_outputs_and_the_uploads() {
        let (mut t, id) = table();
        let ca = info(CA, Some("fixed:r:sha256:abc"));
        let doc = info(DOC, None);
        t.uploaded(&id, "out", ca.clone());
        let mut outs = BTreeMap::from([("out".to_string(), ca.clone())]);
        assert!(matches!(
            t.check_result(&id, &outs),
            Err(Violation::OutputsDiffer { .. })
        ));
        outs.insert("doc".into(), doc.clone());
        let checks = t.check_result(&id, &outs).unwrap();
        assert_eq!(checks["out"], OutputCheck::Uploaded);
        assert_eq!(checks["doc"], OutputCheck::InStore(doc.clone()));
        // a result claiming another hash than the upload
        let mut lied = ca.clone();
        lied.nar_hash = [2; 32];
        outs.insert("out".into(), lied);
        assert!(matches!(
            t.check_result(&id, &outs),
            Err(Violation::UploadDiffers { .. })
        ));
        assert!(matches!(
            t.check_result("nope", &outs),
            Err(Violation::UnknownJob(_))
        ));
        assert_eq!(t.drvs().len(), 1);
        assert!(t.take(&id).is_some());
        assert!(t.is_empty());
    }
}
