//! Storage throughput probe: times a background save (hand-over, upload), `verify` and
//! `load_step` of a checkpoint of a given size against any out_dir.
//!
//!   cargo run --release -p mla-storage --example save_bench -- <out_dir> <total_mib> [objects]
//!
//! Not a training benchmark (no tensors; the trainer's copy to host memory is not included).

use std::time::Instant;

use mla_storage::{
    BackgroundSaver, BlockingCheckpointStore, Bytes, ManifestMeta, SaveJob, StepName,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out_dir = args
        .get(1)
        .ok_or("usage: save_bench <out_dir> <total_mib> [objects]")?;
    let total_mib: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let n_objects: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let per_object = (total_mib << 20) / n_objects.max(1);
    let objects: Vec<(String, Bytes)> = (0..n_objects)
        .map(|i| {
            let bytes: Vec<u8> = (0..per_object).map(|j| (j * 31 + i * 7) as u8).collect();
            (format!("object-{i}.bin"), Bytes::from(bytes))
        })
        .collect();
    let total_bytes: u64 = objects.iter().map(|(_, b)| b.len() as u64).sum();
    let store = BlockingCheckpointStore::open(out_dir)?;
    let mut saver = BackgroundSaver::new(store.store().clone())?;
    let step = StepName::Step(1);
    let t0 = Instant::now();
    saver.save(SaveJob {
        step: step.clone(),
        objects,
        meta: ManifestMeta {
            step: 1,
            ..Default::default()
        },
        keep_last: None,
    });
    let handed_over = t0.elapsed();
    let report = saver.wait().ok_or("no report")?;
    report.result.as_ref().map_err(|e| e.to_string())?;
    let t1 = Instant::now();
    store.verify(&step)?;
    let verify = t1.elapsed();
    let t2 = Instant::now();
    let loaded = store.load_step(&step)?;
    let load = t2.elapsed();
    let mib = total_bytes as f64 / (1 << 20) as f64;
    println!(
        "{}: {mib:.0} MiB in {n_objects} objects | save() blocked {:.2} ms | upload {:.2} s ({:.0} MiB/s) | verify {:.2} s ({:.0} MiB/s) | load {:.2} s ({:.0} MiB/s, {} objects)",
        store.url(),
        handed_over.as_secs_f64() * 1e3,
        report.elapsed.as_secs_f64(),
        mib / report.elapsed.as_secs_f64(),
        verify.as_secs_f64(),
        mib / verify.as_secs_f64(),
        load.as_secs_f64(),
        mib / load.as_secs_f64(),
        loaded.objects.len(),
    );
    store.delete_step(&step)?;
    Ok(())
}
