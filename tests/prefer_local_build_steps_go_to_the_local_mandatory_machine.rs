//! Hydra's `preferLocalBuild` through the running scheduler (real actors and database, in-process
//! machines, zero-time executor): with a faster `localhost` whose mandatory feature is `local`
//! beside a plain machine, every step whose drv says `preferLocalBuild` (in its env, or in its
//! structured attributes' `__json`) is built on `localhost`, and every other step — a plain one, or
//! one that prefers a local build but needs a feature `localhost` lacks — on the other machine.
//! On SQLite and PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::inproc::{self, in_actix};
use common::instantiate::Kind;
use common::qr::Backend;
use qr::actors::dispatcher::MachineInfo;
use qr::actors::dispatcher::actor::GetMachines;
use qr::actors::machine::simulated::SimulatedExecutor;
use qr::actors::step::RetryPolicy;
use qr::db::types::{BuildStatus, StepType};

fn machine(id: &str, mandatory: &[&str], supported: &[&str], speed: f64) -> MachineInfo {
    MachineInfo {
        id: id.into(),
        systems: [inproc::system()].into(),
        supported_features: supported.iter().map(|s| s.to_string()).collect(),
        mandatory_features: mandatory.iter().map(|s| s.to_string()).collect(),
        max_jobs: 4,
        speed_factor: speed,
    }
}

fn prefer_local_steps_go_to_localhost(backend: Backend) {
    in_actix(async {
        let machines = vec![
            // Faster, so the dispatcher offers it every step first.
            machine("localhost", &["local"], &[], 2.0),
            machine("remote", &[], &["kvm"], 1.0),
        ];
        let Some(mut r) = inproc::rig_with(
            backend,
            inproc::Setup {
                machines,
                retry: RetryPolicy::default(),
                scheduling: Default::default(),
                before_start: vec![],
            },
            |_, store| Arc::new(SimulatedExecutor::new(store.clone())),
        )
        .await
        else {
            return;
        };
        // Both machines joined before anything is queued (else the first to join takes all).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while r
            .sched
            .dispatcher
            .send(GetMachines)
            .await
            .expect("machines")
            .len()
            < 2
        {
            assert!(
                std::time::Instant::now() < deadline,
                "machines did not join"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut g = r.instantiator();
        let mut add = |name: &str, attrs: &[(&str, &str)]| {
            g.add(Kind::Ia, name, &format!("echo {name} > $out"), attrs, &[])
        };
        let plain = add("plain", &[]);
        let not_preferred = add("not-preferred", &[("preferLocalBuild", "")]);
        let cheap = add("cheap", &[("preferLocalBuild", "1")]);
        let cheap_json = add(
            "cheap-json",
            &[(
                "__json",
                r#"{"preferLocalBuild":true,"allowSubstitutes":false}"#,
            )],
        );
        let cheap_kvm = add(
            "cheap-kvm",
            &[("preferLocalBuild", "1"), ("requiredSystemFeatures", "kvm")],
        );
        let inputs = [&plain, &not_preferred, &cheap, &cheap_json, &cheap_kvm];
        let script = format!(
            "cat {} > $out",
            inputs
                .iter()
                .map(|d| g.out(d))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let inputs: Vec<&str> = inputs.iter().map(|s| s.as_str()).collect();
        let top = g.add(Kind::Ia, "top", &script, &[], &inputs);
        let id = r.queue(&g, &top).await;
        assert_eq!(r.finished(id).await, BuildStatus::Success);
        let built: BTreeMap<String, String> = r
            .closed_steps(id)
            .await
            .into_iter()
            .filter(|s| s.step_type == StepType::Build && s.status == Some(BuildStatus::Success))
            .map(|s| (s.drv_path, s.machine))
            .collect();
        let want: BTreeMap<String, String> = [
            (&plain, "remote"),
            (&not_preferred, "remote"),
            (&cheap, "localhost"),
            (&cheap_json, "localhost"),
            (&cheap_kvm, "remote"),
            (&top, "remote"),
        ]
        .into_iter()
        .map(|(d, m)| (d.clone(), m.to_string()))
        .collect();
        assert_eq!(built, want);
    });
}

#[test]
fn prefer_local_build_steps_go_to_the_local_mandatory_machine_sqlite() {
    prefer_local_steps_go_to_localhost(Backend::Sqlite);
}

#[test]
fn prefer_local_build_steps_go_to_the_local_mandatory_machine_postgres() {
    prefer_local_steps_go_to_localhost(Backend::Postgres);
}
