//! AWS secrets and an endpoint URL's password never appear in errors (Display, Debug, source
//! chain), in the store's or the saver's Debug, nor in what `redact_secrets` lets through.
//!
//! Its own test binary with a single test because it rewrites the process environment.

mod common;

use std::time::Duration;

use mla_storage::{
    redact_secrets, BackgroundSaver, BlockingCheckpointStore, CheckpointStore, RetryOptions,
    SaveJob, StoreOptions,
};

fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "{what} leaks a secret: {text}");
    }
}

fn assert_error_clean(err: &mla_storage::Error, secrets: &[&str]) {
    assert_clean("Display", &err.to_string(), secrets);
    assert_clean("Debug", &format!("{err:?}"), secrets);
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        assert_clean("source", &s.to_string(), secrets);
        source = s.source();
    }
}

fn quick() -> StoreOptions {
    StoreOptions {
        connect_timeout: Some(Duration::from_millis(500)),
        request_timeout: Some(Duration::from_secs(2)),
        retry: RetryOptions {
            max_retries: 1,
            init_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            retry_timeout: Duration::from_secs(2),
        },
        ..StoreOptions::default()
    }
}

#[test]
fn secrets_never_appear_in_errors_or_debug_output() {
    // 1. Against the S3 test server, if running: a bucket that does not exist.
    if common::s3_env().is_some() {
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
        let key_id = std::env::var("AWS_ACCESS_KEY_ID").unwrap();
        let store =
            BlockingCheckpointStore::open_with("s3://mla-no-such-bucket/p", quick()).unwrap();
        let err = store.list().unwrap_err();
        eprintln!("missing bucket: {err}");
        assert_error_clean(&err, &[&secret, &key_id]);
        assert_clean("store Debug", &format!("{store:?}"), &[&secret, &key_id]);
    }

    // 2. Sentinel credentials and an endpoint where nothing listens.
    let secret = "mla-sentinel-secret-3f9a1c";
    let token = "mla-sentinel-session-token-77d0";
    let key_id = "AKIAMLASENTINEL0001";
    // A password in the endpoint's user-info (finding 8 of issue 14) is a secret too.
    let password = "mla-sentinel-endpoint-pw-91";
    let endpoint = format!("http://mla-user:{password}@127.0.0.1:1");
    let all = [secret, token, key_id, password];
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", key_id),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_SESSION_TOKEN", token),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(k, v);
    }
    let store = CheckpointStore::open_with("s3://bucket/prefix", quick()).unwrap();
    assert_clean("store Debug", &format!("{store:?}"), &all);
    let blocking = BlockingCheckpointStore::new(store.clone()).unwrap();
    let err = blocking.list().unwrap_err();
    eprintln!("unreachable endpoint: {err}");
    assert!(err.to_string().contains("s3://bucket/prefix"), "{err}");
    assert_error_clean(&err, &all);
    let err = blocking.latest_valid().unwrap_err();
    assert_error_clean(&err, &all);

    let mut saver = BackgroundSaver::new(store).unwrap();
    assert_clean("saver Debug", &format!("{saver:?}"), &all);
    saver.save(SaveJob {
        step: common::step(1),
        objects: common::objects(1),
        meta: common::meta(1),
        keep_last: Some(1),
    });
    let report = saver.wait().unwrap();
    assert_clean("report Debug", &format!("{report:?}"), &all);
    assert_error_clean(report.result.as_ref().unwrap_err(), &all);

    // 3. Whatever a server echoes back is scrubbed before it reaches an error.
    let echoed = format!(
        "SignatureDoesNotMatch <AWSAccessKeyId>{key_id}</AWSAccessKeyId> {secret} at {endpoint}/bucket"
    );
    assert_clean("redact_secrets", &redact_secrets(&echoed), &all);
}
