//! S3 outage during a background save: the test server is paused (SIGSTOP) half-way through an
//! upload, so requests time out; the save must be reported as failed, leave no visible step,
//! and the next save must succeed once the server answers again (SIGCONT).
//!
//! Its own test binary because pausing the shared server would stall concurrent S3 tests.
//! Runs only with the environment of `scripts/s3_server.sh start` (needs `MLA_TEST_S3_PID`).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use mla_storage::{BackgroundSaver, BlockingCheckpointStore, RetryOptions, SaveJob, StoreOptions};

/// SIGSTOP on creation, SIGCONT on drop (also when the test panics).
struct Paused(String);

impl Paused {
    fn new(pid: &str) -> Paused {
        let ok = Command::new("kill").args(["-STOP", pid]).status().unwrap();
        assert!(ok.success(), "kill -STOP {pid}");
        Paused(pid.to_string())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

fn job(n: u64) -> SaveJob {
    SaveJob {
        step: step(n),
        objects: objects(n),
        meta: meta(n),
        keep_last: None,
    }
}

#[test]
fn saver_reports_failed_upload_when_s3_stops_mid_save_then_next_save_succeeds() {
    let Some(out_dir) = s3_out_dir("s3_outage") else {
        return;
    };
    let pid = std::env::var("MLA_TEST_S3_PID").expect("MLA_TEST_S3_PID (scripts/s3_server.sh)");
    let opts = StoreOptions {
        request_timeout: Some(Duration::from_secs(1)),
        connect_timeout: Some(Duration::from_secs(1)),
        retry: RetryOptions {
            max_retries: 2,
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            retry_timeout: Duration::from_secs(4),
        },
        ..StoreOptions::default()
    };
    let store = mla_storage::CheckpointStore::open_with(&out_dir, opts).unwrap();
    // Slow every PUT down so the pause below lands in the middle of the save.
    let faults = std::sync::Arc::new(Faults::default());
    let f2 = faults.clone();
    let slow = store.clone().map_backend(move |inner| {
        std::sync::Arc::new(FaultStore::new(inner, f2))
            as std::sync::Arc<dyn mla_storage::object_store::ObjectStore>
    });
    let mut saver = BackgroundSaver::new(slow).unwrap();
    saver.save(job(1));
    assert!(saver.wait().unwrap().is_ok());

    faults.set_put_delay(Some(Duration::from_millis(300)));
    let t0 = Instant::now();
    saver.save(job(2));
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "save() must not block"
    );
    std::thread::sleep(Duration::from_millis(450)); // first object up, second in flight
    let failed = {
        let _paused = Paused::new(&pid);
        saver.wait().unwrap()
    };
    let err = failed.result.as_ref().unwrap_err();
    eprintln!("failed save reported as: {err}");
    assert_eq!(failed.consecutive_failures, 1);

    faults.set_put_delay(None);
    saver.save(job(3));
    let ok = saver.wait().unwrap();
    assert!(ok.is_ok(), "{:?}", ok.result);
    assert_eq!(ok.consecutive_failures, 0);

    let blocking = BlockingCheckpointStore::new(store).unwrap();
    let latest = blocking.latest_valid().unwrap();
    assert_eq!(latest.found.unwrap().step, step(3));
    let list = blocking.list().unwrap();
    let s2 = list
        .iter()
        .find(|i| i.step == step(2))
        .expect("step 2 was half-written");
    assert!(!s2.exists(), "a failed save must stay invisible");
    assert!(s2.object_count >= 1 && s2.object_count < objects(2).len());
}
