//! The storage conformance suite: every behaviour of the checkpoint protocol, written once as a
//! function over a `Fixture` and instantiated for memory, a local temp dir and S3 (the last only
//! with the environment of `scripts/s3_server.sh start`; `MLA_REQUIRE_S3=1` makes its absence
//! a failure).
//!
//! Not here: the S3-outage test (pauses the shared server: `s3_outage.rs`) and the
//! secrets-in-errors test (mutates the process environment: `secrets.rs`).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use mla_storage::{
    BackgroundSaver, BlockingCheckpointStore, CheckpointStore, Corruption, Error, Holder, SaveJob,
    StepName, Verification, LEASE_OBJECT, MANIFEST_NAME,
};

// ---- protocol --------------------------------------------------------------------------------

async fn round_trip_preserves_bytes_and_manifest(f: &Fixture) {
    let objs = objects(400);
    let written = f
        .store
        .write_step(&step(400), &objs, meta(400))
        .await
        .unwrap();
    assert_eq!(written.objects.len(), objs.len());
    for (name, bytes) in &objs {
        assert_eq!(&f.store.read_object(&step(400), name).await.unwrap(), bytes);
    }
    let m = f.store.read_manifest(&step(400)).await.unwrap();
    assert_eq!(m, written);
    assert_eq!((m.step, m.tokens_seen, m.world_size), (400, 400 * 4096, 2));
    assert_eq!(m.config_digest, "sha256:cafe");
    assert_eq!(m.extra["note"], "test");
    assert_eq!(m.format_version, mla_storage::FORMAT_VERSION);
    assert_eq!(
        m.object("state.json").unwrap().sha256,
        mla_storage::sha256_hex(b"{\"step\":400}")
    );
    assert_eq!(f.store.verify(&step(400)).await.unwrap(), m);
    let loaded = f.store.load_step(&step(400)).await.unwrap();
    assert_eq!(loaded.objects.len(), objs.len());
    assert_eq!(loaded.object("model.safetensors"), Some(&objs[0].1));
    // The manifest on storage is the documented JSON.
    let raw = f.raw_get(&format!("step-00000400/{MANIFEST_NAME}")).await;
    let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(json["name"], "step-00000400");
    assert_eq!(json["objects"][0]["name"], "model.safetensors");
    assert_eq!(json["objects"][0]["size_bytes"], 3000);
}

async fn step_without_manifest_is_invisible(f: &Fixture) {
    f.store
        .write_step(&step(100), &objects(100), meta(100))
        .await
        .unwrap();
    // A save that uploaded its objects and died before the manifest.
    for (name, bytes) in objects(200) {
        f.store.put_object(&step(200), &name, bytes).await.unwrap();
    }
    let list = f.store.list().await.unwrap();
    let s200 = list.iter().find(|i| i.step == step(200)).unwrap();
    assert!(!s200.exists());
    assert!(matches!(
        s200.manifest_error,
        Some(Error::MissingManifest { .. })
    ));
    assert!(matches!(
        f.store.read_manifest(&step(200)).await,
        Err(Error::MissingManifest { .. })
    ));
    assert!(matches!(
        f.store.read_object(&step(200), "model.safetensors").await,
        Err(Error::MissingManifest { .. })
    ));
    let latest = f.store.latest_valid().await.unwrap();
    assert_eq!(latest.found.unwrap().step, step(100));
}

async fn latest_valid_skips_step_without_manifest(f: &Fixture) {
    f.store
        .write_step(&step(1), &objects(1), meta(1))
        .await
        .unwrap();
    f.store
        .put_object(&step(2), "model.safetensors", payload(10, 2))
        .await
        .unwrap();
    let latest = f.store.latest_valid().await.unwrap();
    assert_eq!(latest.found.unwrap().step, step(1));
    assert_eq!(latest.skipped.len(), 1);
    assert_eq!(latest.skipped[0].step, step(2));
    assert!(matches!(
        latest.skipped[0].reason,
        Error::MissingManifest { .. }
    ));
}

async fn latest_valid_is_none_for_empty_out_dir(f: &Fixture) {
    let latest = f.store.latest_valid().await.unwrap();
    assert!(latest.found.is_none());
    assert!(latest.skipped.is_empty());
    assert!(f.store.list().await.unwrap().is_empty());
}

async fn manifest_is_written_after_every_object(f: &Fixture) {
    let (store, faults) = f.faulty();
    store
        .write_step(&step(3), &objects(3), meta(3))
        .await
        .unwrap();
    let puts: Vec<String> = faults
        .log()
        .into_iter()
        .filter(|l| l.starts_with("put"))
        .collect();
    assert_eq!(puts.len(), objects(3).len() + 1, "{puts:?}");
    assert!(
        puts.last()
            .unwrap()
            .ends_with("step-00000003/manifest.json"),
        "{puts:?}"
    );
}

async fn crash_before_manifest_leaves_step_invisible(f: &Fixture) {
    f.store
        .write_step(&step(10), &objects(10), meta(10))
        .await
        .unwrap();
    let (store, faults) = f.faulty();
    faults.set_fail_puts_containing(Some("step-00000020/manifest.json"));
    let err = store
        .write_step(&step(20), &objects(20), meta(20))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("manifest.json"), "{err}");
    // Without its manifest step 20 does not exist, and the failed save took its objects
    // with it (they would only fill the disk).
    assert!(!f.raw_exists("step-00000020/model.safetensors").await);
    let latest = f.store.latest_valid().await.unwrap();
    assert_eq!(latest.found.unwrap().step, step(10));
    assert!(latest.skipped.is_empty(), "{:?}", latest.skipped);
}

async fn verify_names_the_corrupt_object(f: &Fixture) {
    f.store
        .write_step(&step(5), &objects(5), meta(5))
        .await
        .unwrap();
    f.flip_byte("step-00000005/optimizer.safetensors", 1234)
        .await;
    let err = f.store.verify(&step(5)).await.unwrap_err();
    match &err {
        Error::Corrupt {
            step: s,
            object,
            problem,
            ..
        } => {
            assert_eq!(s, &step(5));
            assert_eq!(object, "optimizer.safetensors");
            assert!(matches!(problem, Corruption::Sha256Mismatch { .. }));
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert_eq!(err.object(), Some("optimizer.safetensors"));
    let msg = err.to_string();
    assert!(
        msg.contains("step-00000005") && msg.contains("optimizer.safetensors"),
        "{msg}"
    );
    // Reading the bad object is refused; a good one of the same step is fine.
    assert!(matches!(
        f.store.read_object(&step(5), "optimizer.safetensors").await,
        Err(Error::Corrupt { .. })
    ));
    assert!(f
        .store
        .read_object(&step(5), "model.safetensors")
        .await
        .is_ok());
}

async fn verify_reports_missing_and_truncated_objects(f: &Fixture) {
    f.store
        .write_step(&step(6), &objects(6), meta(6))
        .await
        .unwrap();
    f.raw_put("step-00000006/model.safetensors", b"short").await;
    match f.store.verify(&step(6)).await.unwrap_err() {
        Error::Corrupt {
            object, problem, ..
        } => {
            assert_eq!(object, "model.safetensors");
            assert_eq!(
                problem,
                Corruption::SizeMismatch {
                    expected_bytes: 3000,
                    actual_bytes: 5
                }
            );
        }
        other => panic!("{other}"),
    }
    f.store
        .write_step(&step(7), &objects(7), meta(7))
        .await
        .unwrap();
    // Delete one object behind the store's back.
    f.raw_delete("step-00000007/state.json").await;
    match f.store.verify(&step(7)).await.unwrap_err() {
        Error::Corrupt {
            object, problem, ..
        } => {
            assert_eq!(
                (object.as_str(), problem),
                ("state.json", Corruption::Missing)
            );
        }
        other => panic!("{other}"),
    }
}

async fn invalid_manifest_makes_step_invisible(f: &Fixture) {
    f.store
        .write_step(&step(1), &objects(1), meta(1))
        .await
        .unwrap();
    f.store
        .write_step(&step(2), &objects(2), meta(2))
        .await
        .unwrap();
    f.raw_put(
        "step-00000002/manifest.json",
        b"{\"format_version\": 1, trunc",
    )
    .await;
    let list = f.store.list().await.unwrap();
    let s2 = list.iter().find(|i| i.step == step(2)).unwrap();
    assert!(!s2.exists());
    assert!(matches!(
        s2.manifest_error,
        Some(Error::InvalidManifest { .. })
    ));
    let latest = f.store.latest_valid().await.unwrap();
    assert_eq!(latest.found.unwrap().step, step(1));
    assert!(matches!(
        latest.skipped[0].reason,
        Error::InvalidManifest { .. }
    ));
}

async fn latest_valid_falls_back_past_corrupted_newest_step(f: &Fixture) {
    for n in [100, 200, 300] {
        f.store
            .write_step(&step(n), &objects(n), meta(n))
            .await
            .unwrap();
    }
    f.flip_byte("step-00000300/model.safetensors", 0).await;
    let latest = f.store.latest_valid().await.unwrap();
    let found = latest.found.unwrap();
    assert_eq!(found.step, step(200));
    assert_eq!(found.manifest.tokens_seen, 200 * 4096);
    assert_eq!(latest.skipped.len(), 1);
    assert_eq!(latest.skipped[0].step, step(300));
    assert_eq!(latest.skipped[0].reason.object(), Some("model.safetensors"));
    // The loading variant agrees and hands over the bytes it verified.
    let loaded = f.store.load_latest_valid().await.unwrap().found.unwrap();
    assert_eq!(loaded.step, step(200));
    assert_eq!(loaded.objects.len(), objects(200).len());
}

async fn latest_valid_orders_final_by_its_step(f: &Fixture) {
    // A run that finished at step 381, then was extended past it.
    f.store
        .write_step(&StepName::Final, &objects(381), meta(381))
        .await
        .unwrap();
    f.store
        .write_step(&step(300), &objects(300), meta(300))
        .await
        .unwrap();
    assert_eq!(
        f.store.latest_valid().await.unwrap().found.unwrap().step,
        StepName::Final
    );
    f.store
        .write_step(&step(400), &objects(400), meta(400))
        .await
        .unwrap();
    assert_eq!(
        f.store.latest_valid().await.unwrap().found.unwrap().step,
        step(400)
    );
}

async fn retention_keeps_newest_valid_and_final(f: &Fixture) {
    for n in 1..=5 {
        f.store
            .write_step(&step(n), &objects(n), meta(n))
            .await
            .unwrap();
    }
    f.store
        .write_step(&StepName::Final, &objects(9), meta(9))
        .await
        .unwrap();
    f.raw_put("notes.txt", b"not a checkpoint").await;
    f.raw_put("logs/metrics.jsonl", b"{}").await;
    let report = f.store.retain(2).await.unwrap();
    assert_eq!(report.newest_valid, Some(step(5)));
    assert_eq!(report.deleted, vec![step(1), step(2), step(3)]);
    let left: Vec<StepName> = f
        .store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.step)
        .collect();
    assert_eq!(left, vec![step(4), step(5), StepName::Final]);
    assert!(f.raw_exists("notes.txt").await && f.raw_exists("logs/metrics.jsonl").await);
    assert!(!f.raw_exists("step-00000001/model.safetensors").await);
}

async fn retention_never_deletes_newest_valid_step(f: &Fixture) {
    for n in [1, 2, 3] {
        f.store
            .write_step(&step(n), &objects(n), meta(n))
            .await
            .unwrap();
    }
    f.flip_byte("step-00000003/state.json", 0).await; // newest committed step is corrupt
                                                      // An uncommitted directory newer than everything may be a save in flight: left alone.
    f.store
        .put_object(&step(4), "model.safetensors", payload(10, 4))
        .await
        .unwrap();
    // An uncommitted directory older than the kept steps is crash debris: removed.
    f.store
        .put_object(&step(0), "model.safetensors", payload(10, 0))
        .await
        .unwrap();
    let report = f.store.retain(1).await.unwrap();
    assert_eq!(report.newest_valid, Some(step(2)));
    assert_eq!(report.deleted, vec![step(0), step(1)]);
    let left: Vec<StepName> = f
        .store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.step)
        .collect();
    assert_eq!(left, vec![step(2), step(3), step(4)]);
    assert_eq!(
        f.store.latest_valid().await.unwrap().found.unwrap().step,
        step(2)
    );
}

async fn delete_removes_manifest_first(f: &Fixture) {
    f.store
        .write_step(&step(8), &objects(8), meta(8))
        .await
        .unwrap();
    let (store, faults) = f.faulty();
    store.delete_step(&step(8)).await.unwrap();
    let deletes: Vec<String> = faults
        .log()
        .into_iter()
        .filter(|l| l.starts_with("delete"))
        .collect();
    // The manifest, the objects, then whatever stands at the step's own name (a link in
    // place of a local step directory; nothing here).
    assert_eq!(deletes.len(), objects(8).len() + 2, "{deletes:?}");
    assert!(
        deletes[0].ends_with("step-00000008/manifest.json"),
        "{deletes:?}"
    );
    assert!(
        deletes[deletes.len() - 1].ends_with("step-00000008"),
        "{deletes:?}"
    );
    assert!(f.store.list().await.unwrap().is_empty());
    // Deleting what is not there is fine.
    f.store.delete_step(&step(8)).await.unwrap();
}

async fn overwriting_a_step_never_mixes_old_and_new_objects(f: &Fixture) {
    f.store
        .write_step(&step(50), &objects(50), meta(50))
        .await
        .unwrap();
    // Rewrite with different contents and fewer objects; the first attempt dies half-way.
    let new_objs = vec![("model.safetensors".to_string(), payload(777, 5050))];
    let (store, faults) = f.faulty();
    faults.set_fail_puts_containing(Some("step-00000050/model.safetensors"));
    assert!(store
        .write_step(&step(50), &new_objs, meta(50))
        .await
        .is_err());
    // The old manifest went first: the step is invisible, not a mix of old and new.
    assert!(matches!(
        f.store.read_manifest(&step(50)).await,
        Err(Error::MissingManifest { .. })
    ));
    assert!(!f.raw_exists("step-00000050/optimizer.safetensors").await);
    faults.set_fail_puts_containing(None);
    store
        .write_step(&step(50), &new_objs, meta(50))
        .await
        .unwrap();
    let m = f.store.verify(&step(50)).await.unwrap();
    assert_eq!(m.objects.len(), 1);
    assert_eq!(
        f.store
            .read_object(&step(50), "model.safetensors")
            .await
            .unwrap(),
        new_objs[0].1
    );
    assert!(!f.raw_exists("step-00000050/state.json").await);
}

async fn list_shows_sizes_tokens_and_manifest_presence(f: &Fixture) {
    f.store
        .write_step(&step(1000), &objects(1000), meta(1000))
        .await
        .unwrap();
    f.store
        .write_step(&step(2000), &objects(2000), meta(2000))
        .await
        .unwrap();
    f.store
        .put_object(&step(3000), "model.safetensors", payload(42, 3))
        .await
        .unwrap();
    f.flip_byte("step-00002000/model.safetensors", 7).await;
    let list = f.store.list().await.unwrap();
    assert_eq!(
        list.iter().map(|i| i.step.clone()).collect::<Vec<_>>(),
        vec![step(1000), step(2000), step(3000)]
    );
    let payload_bytes: u64 = objects(1000).iter().map(|(_, b)| b.len() as u64).sum();
    let s1 = &list[0];
    assert!(s1.exists());
    assert_eq!(s1.tokens_seen(), Some(1000 * 4096));
    assert_eq!(s1.object_count, 4);
    assert_eq!(s1.manifest.as_ref().unwrap().total_bytes(), payload_bytes);
    assert!(s1.total_bytes > payload_bytes, "includes the manifest");
    assert!(matches!(s1.verification, Verification::NotChecked));
    assert_eq!(
        (list[2].exists(), list[2].total_bytes, list[2].tokens_seen()),
        (false, 42, None)
    );
    let verified = f.store.list_verified().await.unwrap();
    assert!(matches!(verified[0].verification, Verification::Verified));
    match &verified[1].verification {
        Verification::Failed(e) => assert_eq!(e.object(), Some("model.safetensors")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(verified[2].verification, Verification::NotChecked));
}

async fn resolve_opens_step_dirs_from_paths_and_urls(f: &Fixture) {
    f.store
        .write_step(&step(400), &objects(400), meta(400))
        .await
        .unwrap();
    for spelling in [
        format!("{}/step-00000400", f.out_dir),
        format!("{}/step-00000400/", f.out_dir),
    ] {
        let (store, s) = CheckpointStore::resolve(&spelling).unwrap();
        assert_eq!(s, step(400), "{spelling}");
        if f.persistent {
            assert_eq!(store.url(), f.store.url());
            assert_eq!(
                store.read_object(&s, "state.json").await.unwrap(),
                objects(400)[2].1
            );
        }
    }
    if f.kind == "local" {
        let file_url = format!("file://{}/final", f.out_dir);
        assert_eq!(
            CheckpointStore::resolve(&file_url).unwrap().1,
            StepName::Final
        );
    }
    assert!(matches!(
        CheckpointStore::resolve(&f.out_dir),
        Err(Error::NotAStepDir { .. })
    ));
}

async fn large_object_goes_up_as_multipart(f: &Fixture) {
    let (store, faults) = f.faulty();
    // 20 MiB + a bit with the default 16 MiB threshold and 8 MiB parts → 3 parts.
    let big = payload((20 << 20) + 123, 99);
    let small = payload(1000, 98);
    let out = store
        .put_object(&step(9), "model.safetensors", big.clone())
        .await
        .unwrap();
    assert!(out.multipart);
    assert_eq!(out.parts, 3);
    if f.kind == "s3" {
        let etag = out.e_tag.clone().unwrap_or_default();
        assert!(
            etag.trim_matches('"').ends_with("-3"),
            "S3 multipart ETag: {etag}"
        );
    }
    let single = store
        .put_object(&step(9), "state.json", small.clone())
        .await
        .unwrap();
    assert!(!single.multipart && single.parts == 1);
    let log = faults.log();
    assert!(log.contains(&format!(
        "put-multipart {}",
        f.raw_path("step-00000009/model.safetensors")
    )));
    assert!(log.contains(&format!("put {}", f.raw_path("step-00000009/state.json"))));
    store
        .commit_step(&step(9), meta(9), vec![out.entry, single.entry])
        .await
        .unwrap();
    assert_eq!(
        f.store
            .read_object(&step(9), "model.safetensors")
            .await
            .unwrap(),
        big
    );
    f.store.verify(&step(9)).await.unwrap();
}

async fn commit_refuses_missing_or_resized_objects(f: &Fixture) {
    let out = f
        .store
        .put_object(&step(11), "a.bin", payload(100, 1))
        .await
        .unwrap();
    let mut ghost = out.entry.clone();
    ghost.name = "b.bin".into();
    let e = f
        .store
        .commit_step(&step(11), meta(11), vec![out.entry.clone(), ghost])
        .await;
    assert!(matches!(
        e,
        Err(Error::Corrupt {
            problem: Corruption::Missing,
            ..
        })
    ));
    let mut wrong = out.entry.clone();
    wrong.size_bytes = 99;
    let e = f.store.commit_step(&step(11), meta(11), vec![wrong]).await;
    assert!(matches!(
        e,
        Err(Error::Corrupt {
            problem: Corruption::SizeMismatch { .. },
            ..
        })
    ));
    assert!(matches!(
        f.store.read_manifest(&step(11)).await,
        Err(Error::MissingManifest { .. })
    ));
    assert!(matches!(
        f.store
            .put_object(&step(11), "manifest.json", payload(1, 1))
            .await,
        Err(Error::InvalidObjectName { .. })
    ));
}

// ---- background saver (synchronous caller, like the training loop) ---------------------------

fn job(n: u64, keep_last: Option<usize>) -> SaveJob {
    SaveJob {
        step: step(n),
        objects: objects(n),
        meta: meta(n),
        keep_last,
    }
}

fn saver_uploads_while_caller_continues(f: &Fixture) {
    let (store, faults) = f.faulty();
    faults.set_put_delay(Some(Duration::from_millis(200)));
    let mut saver = BackgroundSaver::new(store).unwrap();
    let t0 = Instant::now();
    assert!(saver.save(job(100, None)).is_none());
    let handed_over = t0.elapsed();
    // The caller is not blocked by the ≥ 5 × 200 ms of uploads.
    assert!(
        handed_over < Duration::from_millis(150),
        "save() blocked {handed_over:?}"
    );
    assert!(saver.is_busy());
    assert_eq!(saver.in_flight(), Some(&step(100)));
    assert!(saver.poll().is_none(), "not finished yet");
    let report = saver.wait().unwrap();
    assert!(report.is_ok(), "{:?}", report.result);
    assert!(report.elapsed >= Duration::from_millis(1000));
    assert_eq!(
        report.total_bytes,
        objects(100)
            .iter()
            .map(|(_, b)| b.len() as u64)
            .sum::<u64>()
    );
    assert!(saver.wait().is_none(), "each report is delivered once");
    let blocking = BlockingCheckpointStore::new(f.store.clone()).unwrap();
    assert_eq!(
        blocking.latest_valid().unwrap().found.unwrap().step,
        step(100)
    );
}

fn saver_never_runs_two_saves_at_once(f: &Fixture) {
    let (store, faults) = f.faulty();
    faults.set_put_delay(Some(Duration::from_millis(50)));
    let mut saver = BackgroundSaver::new(store).unwrap();
    assert!(saver.save(job(1, None)).is_none());
    // try_save hands the job back while busy…
    let back = saver.try_save(job(2, None)).unwrap_err();
    assert_eq!(back.step, step(2));
    // …save waits for the first and returns its report.
    let first = saver.save(*back).unwrap();
    assert_eq!(first.step, step(1));
    assert!(first.is_ok());
    let second = saver.wait().unwrap();
    assert!(second.is_ok());
    // Every write of step 1 (manifest included) precedes every write of step 2.
    let log: Vec<String> = faults
        .log()
        .into_iter()
        .filter(|l| l.starts_with("put"))
        .collect();
    let last1 = log
        .iter()
        .rposition(|l| l.contains("step-00000001/"))
        .unwrap();
    let first2 = log
        .iter()
        .position(|l| l.contains("step-00000002/"))
        .unwrap();
    assert!(last1 < first2, "{log:?}");
    assert!(log[last1].ends_with("manifest.json"));
}

fn saver_reports_failure_then_next_save_succeeds(f: &Fixture) {
    let (store, faults) = f.faulty();
    let mut saver = BackgroundSaver::new(store).unwrap();
    faults.fail_writes.store(true, Ordering::SeqCst);
    assert!(saver.save(job(10, Some(1))).is_none());
    let failed = saver.wait().unwrap();
    assert!(!failed.is_ok());
    assert_eq!(failed.consecutive_failures, 1);
    assert!(failed.retention.is_none());
    let err = failed.result.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(saver.save(job(20, Some(1))).is_none());
    assert_eq!(saver.wait().unwrap().consecutive_failures, 2);
    // The destination recovers: the next save writes new data and succeeds.
    faults.fail_writes.store(false, Ordering::SeqCst);
    assert!(saver.save(job(30, Some(1))).is_none());
    let ok = saver.wait().unwrap();
    assert!(ok.is_ok(), "{:?}", ok.result);
    assert_eq!(ok.consecutive_failures, 0);
    assert_eq!(saver.consecutive_failures(), 0);
    let blocking = BlockingCheckpointStore::new(f.store.clone()).unwrap();
    let latest = blocking.latest_valid().unwrap();
    assert_eq!(latest.found.unwrap().step, step(30));
}

fn saver_applies_retention_after_each_save(f: &Fixture) {
    let mut saver = BackgroundSaver::new(f.store.clone()).unwrap();
    for n in 1..=4 {
        let previous = saver.save(job(n, Some(2)));
        if let Some(r) = previous {
            assert!(r.is_ok(), "{:?}", r.result);
        }
    }
    let last = saver.wait().unwrap();
    let retention = last.retention.unwrap().unwrap();
    assert_eq!(retention.deleted, vec![step(2)]);
    let blocking = BlockingCheckpointStore::new(f.store.clone()).unwrap();
    let left: Vec<StepName> = blocking
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.step)
        .collect();
    assert_eq!(left, vec![step(3), step(4)]);
}

fn saver_drop_finishes_the_save_in_flight(f: &Fixture) {
    let (store, faults) = f.faulty();
    faults.set_put_delay(Some(Duration::from_millis(50)));
    let mut saver = BackgroundSaver::new(store).unwrap();
    saver.save(job(77, None));
    drop(saver);
    let blocking = BlockingCheckpointStore::new(f.store.clone()).unwrap();
    blocking.verify(&step(77)).unwrap();
}

// ---- out_dir ownership and hygiene (issue 14) -----------------------------------------------

fn holder(run: &str) -> Holder {
    Holder::this_process(Some(run))
}

/// A second store on the same out_dir (another run's view of it).
fn second_view(f: &Fixture) -> BlockingCheckpointStore {
    if f.persistent {
        BlockingCheckpointStore::open(&f.out_dir).unwrap()
    } else {
        BlockingCheckpointStore::new(f.store.clone()).unwrap()
    }
}

fn lease_is_exclusive_names_the_holder_and_is_released_on_drop(f: &Fixture) {
    let a = BlockingCheckpointStore::new(f.store.clone()).unwrap();
    let b = second_view(f);
    let lease = a.acquire_lease(&holder("run-a")).unwrap();
    lease.check().unwrap();
    match b.acquire_lease(&holder("run-b")) {
        Err(e @ Error::Locked { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("run run-a") && msg.contains("pid"), "{msg}");
        }
        other => panic!("second run got {other:?}"),
    }
    drop(lease);
    let lease_b = b.acquire_lease(&holder("run-b")).unwrap();
    lease_b.check().unwrap();
    assert!(matches!(
        a.acquire_lease(&holder("run-a")),
        Err(Error::Locked { .. })
    ));
}

/// The lease object of a run that died without releasing it, written behind the store's back.
async fn plant_lease(f: &Fixture, run: &str) {
    let doc = serde_json::json!({
        "holder": holder(run),
        "renewed": "2026-12-01T00:00:00Z",
        "ttl_secs": 60.0,
    });
    f.raw_put(LEASE_OBJECT, doc.to_string().as_bytes()).await;
}

fn lease_of_a_dead_run_goes_to_its_restart_at_once_and_to_others_when_stale(f: &Fixture) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(plant_lease(f, "run-a"));
    let store = BlockingCheckpointStore::new(f.store.clone()).unwrap();
    let ttl = Duration::from_millis(600);
    // Fresh (just written): another run is refused, with when it may take over.
    let err = store
        .acquire_lease_with_ttl(&holder("run-b"), ttl)
        .unwrap_err();
    assert!(err.to_string().contains("taken over"), "{err}");
    // The same run (the launcher restarting its ranks) takes it at once.
    drop(store.acquire_lease_with_ttl(&holder("run-a"), ttl).unwrap());
    // Not renewed for 2 × ttl: stale, another run takes it.
    rt.block_on(plant_lease(f, "run-a"));
    std::thread::sleep(ttl * 2 + Duration::from_millis(300));
    let lease = store.acquire_lease_with_ttl(&holder("run-b"), ttl).unwrap();
    lease.check().unwrap();
}

fn lease_taken_by_another_run_is_reported_lost(f: &Fixture) {
    let store = BlockingCheckpointStore::new(f.store.clone()).unwrap();
    let ttl = Duration::from_millis(400);
    let lease = store.acquire_lease_with_ttl(&holder("run-a"), ttl).unwrap();
    // Renewals keep it: still ours after several beats.
    std::thread::sleep(ttl);
    lease.check().unwrap();
    // Another run overwrites it (as a takeover would); the next renewal sees a foreign ETag.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(plant_lease(f, "run-b"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while lease.check().is_ok() {
        assert!(
            Instant::now() < deadline,
            "the lost lease was never noticed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = lease.check().unwrap_err();
    assert!(
        matches!(err, Error::LeaseLost { .. }) && err.to_string().contains("run-b"),
        "{err}"
    );
    drop(lease); // must not delete the other run's lease
    assert!(rt.block_on(f.raw_exists(LEASE_OBJECT)));
}

async fn probe_round_trips_and_leaves_nothing(f: &Fixture) {
    f.store.probe().await.unwrap();
    let left: Vec<_> = f
        .store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.step)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(f.raw_list().await.is_empty(), "{:?}", f.raw_list().await);
}

async fn leftovers_of_crashed_saves_are_removed(f: &Fixture) {
    f.store
        .write_step(&step(100), &objects(100), meta(100))
        .await
        .unwrap();
    // A save that died before its manifest.
    for (name, bytes) in objects(200) {
        f.store.put_object(&step(200), &name, bytes).await.unwrap();
    }
    let staging = f.local_dir().map(|d| {
        // Uploads cut off mid-write (object_store's local staging files), in a committed step
        // and in a directory nothing else was written to.
        let files = [
            d.join("step-00000100/model.safetensors#7"),
            d.join("step-00000300/optimizer.safetensors#12"),
        ];
        for p in &files {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, vec![0u8; 4096]).unwrap();
        }
        files
    });
    let left = f.store.clean_leftovers().await.unwrap();
    assert_eq!(left.incomplete_steps, vec![step(200)]);
    f.store.verify(&step(100)).await.unwrap();
    assert!(f
        .raw_list()
        .await
        .iter()
        .all(|p| !p.contains("step-00000200")));
    if let Some(files) = staging {
        assert_eq!(left.staging_files, 2);
        for p in files {
            assert!(!p.exists(), "{} left behind", p.display());
        }
        assert!(!f.local_dir().unwrap().join("step-00000300").exists());
    }
}

async fn failed_save_leaves_no_bytes_behind(f: &Fixture) {
    let (store, faults) = f.faulty();
    faults.set_fail_puts_containing(Some("state.json"));
    let err = store
        .write_step(&step(5), &objects(5), meta(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("state.json"), "{err}");
    assert!(
        f.raw_list()
            .await
            .iter()
            .all(|p| !p.contains("step-00000005")),
        "{:?}",
        f.raw_list().await
    );
}

async fn delete_all_steps_removes_every_step_and_nothing_else(f: &Fixture) {
    for n in [1, 2] {
        f.store
            .write_step(&step(n), &objects(n), meta(n))
            .await
            .unwrap();
    }
    f.store
        .write_step(&StepName::Final, &objects(3), meta(3))
        .await
        .unwrap();
    f.raw_put("metrics.jsonl", b"{}\n").await;
    let mut deleted = f.store.delete_all_steps().await.unwrap();
    deleted.sort_by_key(|s| s.to_string());
    assert_eq!(deleted.len(), 3, "{deleted:?}");
    assert!(f.store.list().await.unwrap().is_empty());
    assert_eq!(f.raw_list().await, vec!["metrics.jsonl".to_string()]);
}

/// Clean-up, retention, `--overwrite` and rewriting a step delete only what is inside the
/// out_dir: a sibling out_dir whose name starts with this one's (`…/run` and `…/run-2`, the
/// same string prefix on S3) keeps every object.
async fn deletes_never_reach_a_sibling_out_dir(f: &Fixture) {
    if !f.persistent {
        return; // memory:// opens a new store each time: no sibling to share it with
    }
    let sibling = CheckpointStore::open(&format!("{}-2", f.out_dir)).unwrap();
    sibling
        .write_step(&step(1), &objects(1), meta(1))
        .await
        .unwrap();
    sibling
        .put_object(&step(2), "model.safetensors", payload(10, 2))
        .await
        .unwrap(); // a crashed save of the sibling run: its own clean-up's business
    let before = sibling.list().await.unwrap();
    for n in [1, 2, 3] {
        f.store
            .write_step(&step(n), &objects(n), meta(n))
            .await
            .unwrap();
    }
    f.store
        .put_object(&step(4), "model.safetensors", payload(10, 4))
        .await
        .unwrap();
    f.store.clean_leftovers().await.unwrap();
    f.store.retain(1).await.unwrap();
    f.store
        .write_step(&step(3), &objects(3), meta(3))
        .await
        .unwrap();
    f.store.delete_all_steps().await.unwrap();
    let after = sibling.list().await.unwrap();
    assert_eq!(
        after
            .iter()
            .map(|i| (i.step.clone(), i.object_count, i.exists()))
            .collect::<Vec<_>>(),
        before
            .iter()
            .map(|i| (i.step.clone(), i.object_count, i.exists()))
            .collect::<Vec<_>>(),
    );
    sibling.verify(&step(1)).await.unwrap();
}

/// Every file below `dir` with its bytes (links described, not followed), sorted.
fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
            if t.is_dir() {
                dirs.push(e.path());
            } else if t.is_symlink() {
                out.push((
                    rel,
                    std::fs::read_link(e.path())
                        .unwrap()
                        .display()
                        .to_string()
                        .into_bytes(),
                ));
            } else {
                out.push((rel, std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Issue 23, finding 1 and 2: a symbolic link anywhere in a local out_dir (in place of a step
/// directory, inside a step, as the lock file, as a loop) never makes mla delete or write
/// outside it. Deleting removes the link itself; reading through one is refused.
#[test]
fn local_symlinks_never_lead_a_delete_or_write_outside_the_out_dir() {
    use std::os::unix::fs::symlink;
    let f = Fixture::local("symlinks_outside").unwrap();
    let store = BlockingCheckpointStore::new(f.store.clone()).unwrap();
    let dir = f.local_dir().unwrap();
    // What must survive: a directory tree and a file outside the out_dir.
    let victim = dir.join("../../victim");
    std::fs::create_dir_all(victim.join("sub")).unwrap();
    std::fs::write(victim.join("a.txt"), b"a").unwrap();
    std::fs::write(victim.join("sub/b.txt"), b"b").unwrap();
    std::fs::write(victim.join("data.bin#3"), b"staging-like").unwrap();
    let victim_file = dir.join("../../victim-file.txt");
    std::fs::write(&victim_file, b"keep me").unwrap();
    let outside = dir.join("../..");
    let before = snapshot(&outside.join("victim"));

    store.write_step(&step(2), &objects(2), meta(2)).unwrap();
    store.write_step(&step(3), &objects(3), meta(3)).unwrap();
    store.write_step(&step(4), &objects(4), meta(4)).unwrap();
    // In place of a step directory, with no manifest behind it (finding 1).
    symlink(&victim, dir.join("step-00000001")).unwrap();
    // Inside a committed step that retention prunes: a linked folder and a linked file.
    symlink(&victim, dir.join("step-00000002/sub")).unwrap();
    symlink(&victim_file, dir.join("step-00000002/extra.bin")).unwrap();
    // A loop and a link to the file-system root: listing must neither hang nor walk them.
    symlink(&dir, dir.join("loop")).unwrap();
    symlink("/", dir.join("root")).unwrap();
    // The lock file (finding 2).
    symlink(&victim_file, dir.join(mla_storage::LOCK_FILE)).unwrap();

    let err = store
        .acquire_lease(&holder("run-a"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("symbolic link"), "{err}");
    let left = store.clean_leftovers().unwrap();
    assert_eq!(left.incomplete_steps, vec![step(1)]);
    assert!(
        std::fs::symlink_metadata(dir.join("step-00000001")).is_err(),
        "the link itself is removed"
    );
    let kept = store.retain(1).unwrap();
    assert!(kept.deleted.contains(&step(2)), "{kept:?}");
    assert!(!dir.join("step-00000002").exists());
    // Rewriting a step whose directory is a link replaces the link, never writes through it.
    symlink(&victim, dir.join("step-00000005")).unwrap();
    store.write_step(&step(5), &objects(5), meta(5)).unwrap();
    assert!(dir.join("step-00000005").is_dir() && !dir.join("step-00000005").is_symlink());
    store.verify(&step(5)).unwrap();
    // A manifest that is a link makes its step invisible, not an error; `--overwrite` too.
    symlink(&victim, dir.join("step-00000006")).unwrap();
    std::fs::create_dir(dir.join("step-00000007")).unwrap();
    symlink(
        dir.join("step-00000005/manifest.json"),
        dir.join("step-00000007/manifest.json"),
    )
    .unwrap();
    assert_eq!(store.latest_valid().unwrap().found.unwrap().step, step(5));
    store.delete_all_steps().unwrap();
    assert!(store.list().unwrap().is_empty());

    assert_eq!(snapshot(&outside.join("victim")), before);
    assert_eq!(std::fs::read(&victim_file).unwrap(), b"keep me");
    assert!(
        dir.join("loop").is_symlink() && dir.join("root").is_symlink(),
        "not ours to remove"
    );
}

#[test]
fn local_symlinks_in_step_directories_are_refused_not_followed() {
    let f = Fixture::local("symlinks").unwrap();
    let store = BlockingCheckpointStore::new(f.store.clone()).unwrap();
    store.write_step(&step(1), &objects(1), meta(1)).unwrap();
    let dir = f.local_dir().unwrap();
    // The same bytes elsewhere, linked into place: the checksums would pass.
    let elsewhere = dir.join("../elsewhere.bin");
    let model = dir.join("step-00000001/model.safetensors");
    std::fs::rename(&model, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &model).unwrap();
    let err = store.verify(&step(1)).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { problem: Corruption::NotRegular { .. }, object, .. } if object == "model.safetensors"),
        "{err}"
    );
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(store.latest_valid().unwrap().found.is_none());
    // A symlinked step directory too.
    store.write_step(&step(2), &objects(2), meta(2)).unwrap();
    let real = dir.join("../step-2-real");
    std::fs::rename(dir.join("step-00000002"), &real).unwrap();
    std::os::unix::fs::symlink(&real, dir.join("step-00000002")).unwrap();
    let err = store.verify(&step(2)).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
}

// ---- instantiation ---------------------------------------------------------------------------

macro_rules! instance {
    (async, $test:ident, $fixture:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            if let Some(f) = $fixture(stringify!($test)) {
                super::$test(&f).await
            }
        }
    };
    (sync, $test:ident, $fixture:path) => {
        #[test]
        fn $test() {
            if let Some(f) = $fixture(stringify!($test)) {
                super::$test(&f)
            }
        }
    };
}

macro_rules! for_each_backend {
    ($($kind:ident $test:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(instance!($kind, $test, Fixture::memory);)*
        }
        mod local {
            use super::*;
            $(instance!($kind, $test, Fixture::local);)*
        }
        mod s3 {
            use super::*;
            $(instance!($kind, $test, Fixture::s3);)*
        }
    };
}

for_each_backend!(
    async round_trip_preserves_bytes_and_manifest,
    async step_without_manifest_is_invisible,
    async latest_valid_skips_step_without_manifest,
    async latest_valid_is_none_for_empty_out_dir,
    async manifest_is_written_after_every_object,
    async crash_before_manifest_leaves_step_invisible,
    async verify_names_the_corrupt_object,
    async verify_reports_missing_and_truncated_objects,
    async invalid_manifest_makes_step_invisible,
    async latest_valid_falls_back_past_corrupted_newest_step,
    async latest_valid_orders_final_by_its_step,
    async retention_keeps_newest_valid_and_final,
    async retention_never_deletes_newest_valid_step,
    async delete_removes_manifest_first,
    async overwriting_a_step_never_mixes_old_and_new_objects,
    async list_shows_sizes_tokens_and_manifest_presence,
    async resolve_opens_step_dirs_from_paths_and_urls,
    async large_object_goes_up_as_multipart,
    async commit_refuses_missing_or_resized_objects,
    sync saver_uploads_while_caller_continues,
    sync saver_never_runs_two_saves_at_once,
    sync saver_reports_failure_then_next_save_succeeds,
    sync saver_applies_retention_after_each_save,
    sync saver_drop_finishes_the_save_in_flight,
    sync lease_is_exclusive_names_the_holder_and_is_released_on_drop,
    async probe_round_trips_and_leaves_nothing,
    async leftovers_of_crashed_saves_are_removed,
    async failed_save_leaves_no_bytes_behind,
    async delete_all_steps_removes_every_step_and_nothing_else,
    async deletes_never_reach_a_sibling_out_dir,
);

/// Lease objects: object stores only (a local out_dir is locked with flock, tested above).
macro_rules! for_each_object_store {
    ($($kind:ident $test:ident),* $(,)?) => {
        mod memory_lease {
            use super::*;
            $(instance!($kind, $test, Fixture::memory);)*
        }
        mod s3_lease {
            use super::*;
            $(instance!($kind, $test, Fixture::s3);)*
        }
    };
}

for_each_object_store!(
    sync lease_of_a_dead_run_goes_to_its_restart_at_once_and_to_others_when_stale,
    sync lease_taken_by_another_run_is_reported_lost,
);
