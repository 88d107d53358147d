//! Criterion benchmarks of the functions every step goes through: parsing and printing a drv,
//! computing its store path, and one dispatcher decision with many steps queued. `qr bench`
//! measures the whole scheduler; these time the pieces alone.
//!
//! `cargo bench --bench hot_functions` (add `-- --quick` for a short run).

use criterion::{Criterion, criterion_group, criterion_main};
use qr::actors::dispatcher::machine::Event;
use qr::bench::scenario::{queued_dispatcher, runnable_step};
use qr::store::{StoreDir, aterm};

/// A drv with inputs, from the bundled example store (paths as real Nix computed them).
const CHAIN_C: &[u8] =
    include_bytes!("../examples/nix-store/6zlnm5ska09mgg8n8m4f4skf6jdk0wm8-chain-c.drv");

fn drv_functions(c: &mut Criterion) {
    let store_dir = StoreDir::new("/nix/store").expect("store dir");
    let drv = aterm::parse_named(CHAIN_C, "chain-c").expect("the example drv parses");
    c.bench_function("aterm::parse (chain-c.drv)", |b| {
        b.iter(|| aterm::parse_named(std::hint::black_box(CHAIN_C), "chain-c"))
    });
    c.bench_function("aterm::print (chain-c.drv)", |b| {
        b.iter(|| aterm::print(std::hint::black_box(&drv)))
    });
    c.bench_function("Derivation::drv_path (chain-c.drv)", |b| {
        b.iter(|| std::hint::black_box(&drv).drv_path(&store_dir))
    });
}

fn dispatcher_decision(c: &mut Criterion) {
    let runnable = 100_000;
    c.bench_function(
        "dispatcher: free a slot and queue a step, 100k runnable",
        |b| {
            let mut d = queued_dispatcher(runnable, 64);
            let system = qr::config::this_system();
            let step = |i: usize| runnable_step(i, &system);
            let mut next = runnable + 64;
            b.iter_batched(
                || {
                    next += 1;
                    step(next)
                },
                |s| {
                    let assigned = d.on(Event::SlotFreed("bench".into()));
                    d.on(Event::Runnable(s));
                    assigned
                },
                criterion::BatchSize::SmallInput,
            )
        },
    );
}

criterion_group!(benches, drv_functions, dispatcher_decision);
criterion_main!(benches);
