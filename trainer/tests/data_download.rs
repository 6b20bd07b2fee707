//! Integration tests of the hub downloads against a small HTTP server on 127.0.0.1 started by each
//! test (common/http.rs). The served archive is built at test time from `../shared/data`
//! TinyStories text; so are the Parquet files of the `--hf-dataset` test.
//! Not here: the real hub (no network in tests).

mod common;

use common::http::{Reply, Server};
use common::{mla_in, ok, repo, shared_data, tokenizer_dir, write_parquet};
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;

use mla_trainer::data::{
    download_file, download_tinystories, download_tokenizer, prepare, DataError, Dataset,
    DownloadOptions, PrepareArgs, Split, Tokenizer,
};

fn opts(endpoint: &str) -> DownloadOptions {
    DownloadOptions {
        endpoint: endpoint.to_owned(),
        progress: false,
    }
}

fn stories(path: &Path, n: usize) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .split("\n<|endoftext|>\n")
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .take(n)
        .collect()
}

/// A TinyStories_all_data-like archive: data00.json (5 stories), data01.json (40 stories).
fn tinystories_archive() -> Vec<u8> {
    let ts = shared_data().join("tinystories");
    let json = |ss: Vec<String>| {
        let v: Vec<_> = ss
            .iter()
            .map(|s| serde_json::json!({"story": s, "source": "GPT-4"}))
            .collect();
        serde_json::to_vec(&v).unwrap()
    };
    let members = [
        (
            "data01.json",
            json(stories(&ts.join("train/tinystories_v1_train_head.txt"), 40)),
        ),
        (
            "data00.json",
            json(stories(
                &ts.join("fixtures/cs336_tinystories_sample.txt"),
                5,
            )),
        ),
    ];
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in &members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, &bytes[..]).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

const ARCHIVE_PATH: &str =
    "/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz";

/// `http://127.0.0.1:<port>` where nothing listens (the port was free a moment ago).
fn refusing_endpoint() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn tinystories_download_lands_the_whole_archive_once_and_prepare_keeps_data00_for_val() {
    let archive = tinystories_archive();
    let server = Server::start(HashMap::from([(
        ARCHIVE_PATH.to_owned(),
        Reply::Ok(archive.clone()),
    )]));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let path = download_tinystories(&cache, &opts(&server.addr)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), archive);
    assert_eq!(dir_names(&cache), vec!["TinyStories_all_data.tar.gz"]);
    // Cached: no second request.
    download_tinystories(&cache, &opts(&server.addr)).unwrap();
    assert_eq!(server.hits(ARCHIVE_PATH), 1);

    let gpt2 = shared_data().join("tokenizers/gpt2");
    let out = tmp.path().join("prepared");
    let report = prepare(&PrepareArgs::new(vec![path], &gpt2, &out)).unwrap();
    assert_eq!(report.index.split(Split::Val).stories, 5);
    assert_eq!(report.index.split(Split::Train).stories, 40);
    assert!(Dataset::open(&out).is_ok());
}

#[test]
fn tokenizer_download_fetches_tokenizer_json_and_an_optional_config() {
    let neox = std::fs::read(shared_data().join("tokenizers/gpt-neox-20b/tokenizer.json")).unwrap();
    let base = "/EleutherAI/pythia-160m/resolve/main";
    let server = Server::start(HashMap::from([(
        format!("{base}/tokenizer.json"),
        Reply::Ok(neox.clone()),
    )]));
    let tmp = tempfile::tempdir().unwrap();
    let dir =
        download_tokenizer("EleutherAI/pythia-160m", tmp.path(), &opts(&server.addr)).unwrap();
    assert_eq!(dir, tmp.path().join("EleutherAI/pythia-160m"));
    assert_eq!(dir_names(&dir), vec!["tokenizer.json"]);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!((tok.vocab_size(), tok.separator_id()), (50277, 0));
    assert_eq!(server.hits(&format!("{base}/tokenizer_config.json")), 1);

    let config = br#"{"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}"#.to_vec();
    let server = Server::start(HashMap::from([
        (format!("{base}/tokenizer.json"), Reply::Ok(neox)),
        (
            format!("{base}/tokenizer_config.json"),
            Reply::Ok(config.clone()),
        ),
    ]));
    let tmp = tempfile::tempdir().unwrap();
    let dir =
        download_tokenizer("EleutherAI/pythia-160m", tmp.path(), &opts(&server.addr)).unwrap();
    assert_eq!(
        std::fs::read(dir.join("tokenizer_config.json")).unwrap(),
        config
    );
    // Present: not downloaded again.
    download_tokenizer("EleutherAI/pythia-160m", tmp.path(), &opts(&server.addr)).unwrap();
    assert_eq!(server.hits(&format!("{base}/tokenizer.json")), 1);
}

#[test]
fn missing_tokenizer_is_a_not_found_error() {
    let server = Server::start(HashMap::new());
    let tmp = tempfile::tempdir().unwrap();
    let e = download_tokenizer("nobody/nothing", tmp.path(), &opts(&server.addr)).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::Download {
                status: Some(404),
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .ends_with("/nobody/nothing/resolve/main/tokenizer.json: HTTP 404 (not found)"),
        "{e}"
    );
}

#[test]
fn interrupted_download_leaves_no_file_in_the_cache() {
    let server = Server::start(HashMap::from([(
        "/f.bin".to_owned(),
        Reply::Truncated {
            len: 100_000,
            body: vec![7; 1000],
        },
    )]));
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("f.bin");
    let e = download_file(
        &format!("{}/f.bin", server.addr),
        &dest,
        &opts(&server.addr),
    )
    .unwrap_err();
    assert!(e.to_string().contains("interrupted"), "{e}");
    assert!(
        dir_names(tmp.path()).is_empty(),
        "{:?}",
        dir_names(tmp.path())
    );
}

#[test]
fn unreachable_endpoint_is_a_clear_offline_error() {
    let tmp = tempfile::tempdir().unwrap();
    let e = download_tinystories(tmp.path(), &opts(&refusing_endpoint())).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("download http://127.0.0.1:"), "{msg}");
    assert!(msg.contains("offline?"), "{msg}");
    assert!(!msg.contains('\n'));
    assert!(dir_names(tmp.path()).is_empty());
}

/// The seed's workflow from nothing: `data: TinyStories` with an empty data path and a
/// missing `checkpoints/<owner>/<name>` tokenizer dir — `mla train` downloads both from
/// `HF_ENDPOINT` (here a local server), tokenizes, and trains; `mla download` does the same
/// for the tokenizer alone.
#[test]
fn train_downloads_tinystories_and_the_tokenizer_from_hf_endpoint() {
    let neox = shared_data().join("tokenizers/gpt-neox-20b/tokenizer.json");
    let tokenizer_path = "/EleutherAI/pythia-160m/resolve/main/tokenizer.json";
    let server = Server::start(HashMap::from([
        (ARCHIVE_PATH.to_owned(), Reply::Ok(tinystories_archive())),
        (
            tokenizer_path.to_owned(),
            Reply::Ok(std::fs::read(&neox).unwrap()),
        ),
    ]));
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo();
    let mla = |args: &[&str]| mla_in(tmp.path(), args, &[("HF_ENDPOINT", &server.addr)]);
    let out = mla(&[
        "train",
        "--device",
        "cpu",
        "--config",
        repo.join("config_hub/pretrain/debug.yaml")
            .to_str()
            .unwrap(),
        "--data",
        "TinyStories",
        "--data.data_path",
        "",
        "--tokenizer_dir",
        "checkpoints/EleutherAI/pythia-160m",
        "--out_dir",
        "out",
        "--model_config.block_size",
        "32",
        "--train.max_steps",
        "2",
        "--train.global_batch_size",
        "2",
        "--train.micro_batch_size",
        "2",
        "--eval.max_iters",
        "1",
    ]);
    ok(&out);
    assert!(tmp
        .path()
        .join("data/tinystories/TinyStories_all_data.tar.gz")
        .is_file());
    assert_eq!(
        std::fs::read(
            tmp.path()
                .join("checkpoints/EleutherAI/pythia-160m/tokenizer.json")
        )
        .unwrap(),
        std::fs::read(&neox).unwrap()
    );
    assert!(tmp.path().join("out/final/manifest.json").is_file());
    assert_eq!(server.hits(ARCHIVE_PATH), 1);

    let out = mla(&[
        "download",
        "EleutherAI/pythia-160m",
        "--tokenizer-only",
        "--checkpoint-dir",
        "ckpts",
    ]);
    ok(&out);
    assert!(tmp
        .path()
        .join("ckpts/EleutherAI/pythia-160m/tokenizer.json")
        .is_file());
}

/// A tokenizer_dir that does not exist and cannot be downloaded (here: an endpoint that refuses
/// connections) is one line naming the key and the repo it tried, exit 2, and no directory is
/// left where it pointed (issue 9: a mistyped relative path left an empty `<owner>/<name>`).
#[test]
fn a_missing_tokenizer_dir_that_cannot_be_downloaded_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let typo = tmp.path().join("tokenizerz/EleutherAI/pythia-160m");
    let run = tmp.path().join("run");
    let mut args = common::train_args(run.to_str().unwrap(), &["--tokenizer_dir"]);
    args.push(typo.to_str().unwrap().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mla_in(tmp.path(), &args, &[("HF_ENDPOINT", &refusing_endpoint())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: tokenizer_dir: ")
            && last.contains("does not exist, and downloading EleutherAI/pythia-160m"),
        "{err}"
    );
    assert!(!tmp.path().join("tokenizerz").exists(), "left behind");
}

/// The shard files and index token counts of a prepared dataset directory, by name.
fn shards(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// `mla prepare --hf-dataset OWNER/NAME` (issue 12): the split's Parquet files, listed by the
/// hub's dataset-viewer API with huggingface.co URLs, are fetched from HF_ENDPOINT into
/// --cache-dir once, and give token for token the shards of the same stories prepared from
/// .txt (train from `train`, val from `validation`); a rerun downloads nothing; an unknown
/// dataset is one line naming the URL and the 404.
#[test]
fn a_hub_dataset_prepares_from_its_parquet_files_as_the_same_text_does() {
    let all = stories(
        &shared_data().join("tinystories/valid/tinystories_v1_valid_head.txt"),
        150,
    );
    let (train, val) = all.split_at(130);
    let tmp = tempfile::tempdir().unwrap();
    let files = tmp.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let parquet = |name: &str, part: &[String]| {
        let p = files.join(name);
        write_parquet(&p, "text", part);
        std::fs::read(p).unwrap()
    };
    let api = "/api/datasets/someone/tiny/parquet/default";
    let hub = "https://huggingface.co";
    let list = |split: &str, n: usize| {
        let urls: Vec<String> = (0..n)
            .map(|i| format!("{hub}{api}/{split}/{i}.parquet"))
            .collect();
        Reply::Ok(serde_json::to_vec(&urls).unwrap())
    };
    let server = Server::start(HashMap::from([
        (format!("{api}/train"), list("train", 2)),
        (
            format!("{api}/train/0.parquet"),
            Reply::Ok(parquet("t0.parquet", &train[..70])),
        ),
        (
            format!("{api}/train/1.parquet"),
            Reply::Ok(parquet("t1.parquet", &train[70..])),
        ),
        (format!("{api}/validation"), list("validation", 1)),
        (
            format!("{api}/validation/0.parquet"),
            Reply::Ok(parquet("v0.parquet", val)),
        ),
    ]));
    let tok = tokenizer_dir();
    let cache = tmp.path().join("cache");
    let hub_out = tmp.path().join("hub");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "prepare",
            "--hf-dataset",
            "someone/tiny",
            "--tokenizer-dir",
            tok.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--out",
            hub_out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        mla_in(tmp.path(), &args, &[("HF_ENDPOINT", server.addr.as_str())])
    };
    ok(&run(&[]));
    assert!(cache
        .join("someone/tiny/default/train/00001.parquet")
        .is_file());

    let txt = tmp.path().join("txt");
    std::fs::create_dir(&txt).unwrap();
    let write = |name: &str, part: &[String]| {
        let p = txt.join(name);
        std::fs::write(&p, part.join("\n<|endoftext|>\n")).unwrap();
        p
    };
    let (t, v) = (write("train.txt", train), write("val.txt", val));
    let from_txt = tmp.path().join("from-txt");
    ok(&mla_in(
        tmp.path(),
        &[
            "prepare",
            t.to_str().unwrap(),
            "--val",
            v.to_str().unwrap(),
            "--tokenizer-dir",
            tok.to_str().unwrap(),
            "--out",
            from_txt.to_str().unwrap(),
            "--quiet",
        ],
        &[],
    ));
    let (a, b) = (shards(&hub_out), shards(&from_txt));
    assert_eq!(
        a.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["train-00000.bin", "val-00000.bin"]
    );
    assert!(a == b, "the hub dataset's shards differ from the text's");

    // A rerun finds every file in the cache: only the listings are fetched again.
    ok(&run(&["--overwrite"]));
    assert_eq!(server.hits(&format!("{api}/train/0.parquet")), 1);
    assert_eq!(server.hits(&format!("{api}/validation/0.parquet")), 1);
    assert_eq!(server.hits(&format!("{api}/train")), 2);

    let out = mla_in(
        tmp.path(),
        &[
            "prepare",
            "--hf-dataset",
            "someone/nothing",
            "--tokenizer-dir",
            tok.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--out",
            tmp.path().join("none").to_str().unwrap(),
        ],
        &[("HF_ENDPOINT", server.addr.as_str())],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("someone/nothing/parquet/default/train") && err.contains("404"),
        "{err}"
    );
    assert!(!tmp.path().join("none").exists());
}

/// A clone of the repository somewhere else, with only what the README's CPU quickstart reads
/// (`config_hub/`): no `shared/data` beside it, no tokenizer, no data.
fn plain_clone(root: &Path) -> std::path::PathBuf {
    let clone = root.join("clone");
    let pretrain = clone.join("config_hub/pretrain");
    std::fs::create_dir_all(&pretrain).unwrap();
    std::fs::copy(
        repo().join("config_hub/pretrain/debug.yaml"),
        pretrain.join("debug.yaml"),
    )
    .unwrap();
    clone
}

/// `mla train` of the quickstart config on the CPU, shrunk by [`QUICK`].
fn quickstart() -> Vec<&'static str> {
    let mut args = vec![
        "train",
        "--device",
        "cpu",
        "--config",
        "config_hub/pretrain/debug.yaml",
    ];
    args.extend_from_slice(&QUICK);
    args
}

/// The quickstart's config, shrunk to seconds: the README's command with smaller numbers.
const QUICK: [&str; 16] = [
    "--model_config.block_size",
    "32",
    "--train.max_steps",
    "3",
    "--train.global_batch_size",
    "2",
    "--train.micro_batch_size",
    "2",
    "--train.lr_warmup_steps",
    "1",
    "--eval.max_iters",
    "1",
    "--eval.interval",
    "3",
    "--train.save_interval",
    "3",
];

/// Issue 26: from a plain clone, the README's CPU quickstart (debug.yaml) fetches the pythia
/// tokenizer and the TinyStories sample from the hub on first use, trains and generates; the
/// sample is the hub's validation split with every 10th story kept for validation.
#[test]
fn the_quickstart_fills_its_tokenizer_and_tinystories_sample_from_the_hub_on_first_use() {
    let all = stories(
        &shared_data().join("tinystories/valid/tinystories_v1_valid_head.txt"),
        300,
    );
    let tmp = tempfile::tempdir().unwrap();
    let parquet = tmp.path().join("validation.parquet");
    write_parquet(&parquet, "text", &all);
    let api = "/api/datasets/roneneldan/TinyStories/parquet/default/validation";
    let file = "/datasets/roneneldan/TinyStories/resolve/refs%2Fconvert%2Fparquet/default/validation/0000.parquet";
    let listing = serde_json::to_vec(&[format!("https://huggingface.co{file}")]).unwrap();
    let neox = shared_data().join("tokenizers/gpt-neox-20b/tokenizer.json");
    let server = Server::start(HashMap::from([
        (api.to_owned(), Reply::Ok(listing)),
        (file.to_owned(), Reply::Ok(std::fs::read(&parquet).unwrap())),
        (
            "/EleutherAI/pythia-160m/resolve/main/tokenizer.json".to_owned(),
            Reply::Ok(std::fs::read(&neox).unwrap()),
        ),
    ]));
    let clone = plain_clone(tmp.path());
    let env = [("HF_ENDPOINT", server.addr.as_str())];
    let args = quickstart();
    let out = mla_in(&clone, &args, &env);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(&out);
    assert!(
        log.contains("TinyStories sample: 270 training and 30 validation stories"),
        "{log}"
    );
    let val =
        std::fs::read_to_string(clone.join("data/tinystories-sample/val/tinystories-sample.txt"))
            .unwrap();
    assert!(val.starts_with(&format!("{}\n<|endoftext|>\n{}\n", all[0], all[10])));
    assert!(clone
        .join("checkpoints/EleutherAI/pythia-160m/tokenizer.json")
        .is_file());
    ok(&mla_in(
        &clone,
        &[
            "generate",
            "out/pretrain/debug/final",
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
        ],
        &env,
    ));
    // A second run finds both in place and asks the hub for nothing more.
    let paths = [
        api,
        file,
        "/EleutherAI/pythia-160m/resolve/main/tokenizer.json",
    ];
    let hits = |s: &Server| paths.map(|p| s.hits(p));
    assert_eq!(hits(&server), [1, 1, 1]);
    let mut again = args.clone();
    again.extend_from_slice(&["--out_dir", "out/again"]);
    ok(&mla_in(&clone, &again, &env));
    assert_eq!(hits(&server), [1, 1, 1], "nothing downloaded twice");
}

/// Issue 26, offline: one line naming what to point at local files, exit 2, and nothing left
/// behind (no partial tokenizer or sample directory).
#[test]
fn the_quickstart_offline_says_what_to_point_at_local_files_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let clone = plain_clone(tmp.path());
    // A port nothing listens on: the hub is unreachable.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let env = [("HF_ENDPOINT", closed.as_str())];
    let mut args = quickstart();
    let out = mla_in(&clone, &args, &env);
    assert_bad_line(&out, &["--tokenizer_dir"]);
    let tok = tokenizer_dir();
    args.extend_from_slice(&["--tokenizer_dir", tok.to_str().unwrap()]);
    let out = mla_in(&clone, &args, &env);
    assert_bad_line(
        &out,
        &[
            "data/tinystories-sample/train",
            "--data.init_args.train_data_path",
            "--data.init_args.val_data_path",
        ],
    );
    // No partial tokenizer or sample (the out_dir the run claimed holds its lock file only).
    assert!(!clone.join("checkpoints").exists() && !clone.join("data").exists());
}

/// Exit 2 and one last `error:` line naming every word of `culprits`.
fn assert_bad_line(out: &std::process::Output, culprits: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        last.starts_with("error: ") && !err.contains("panicked"),
        "{err}"
    );
    for c in culprits {
        assert!(last.contains(c), "names {c}: {last}");
    }
}
