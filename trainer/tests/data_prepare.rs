//! Integration tests of `mla_trainer::data`: tokenizers, `prepare` on the real TinyStories text in
//! `../shared/data`, input formats (text, JSON, compressed, Parquet written by the `parquet`
//! crate and by pyarrow from the project's .venv), the train/val split, and bad-input errors,
//! also as the `mla` binary reports them (exit 2, one `error:` line naming the culprit, no
//! panic), a SIGTERM during `mla prepare`, and distributed preparation (`--worker I/N` runs
//! joined by `--merge`: the single run's token streams, and the merge's refusals).
//! Not here: the loader (data_loader.rs) and downloads (data_download.rs).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_bad, mla, ok, repo, write_parquet};

use mla_trainer::data::{
    check_vocab, merge, prepare, DataError, Dataset, DatasetIndex, PrepareArgs, Split, Tokenizer,
    INDEX_FILE,
};

fn shared_data() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    assert!(
        p.join("tinystories").is_dir() && p.join("tokenizers").is_dir(),
        "test data missing: expected {} (the shared TinyStories text and tokenizers; see shared/data/README.md)",
        p.display()
    );
    p
}

fn neox_dir() -> PathBuf {
    shared_data().join("tokenizers/gpt-neox-20b")
}

fn gpt2_dir() -> PathBuf {
    shared_data().join("tokenizers/gpt2")
}

fn fixture() -> PathBuf {
    shared_data().join("tinystories/fixtures/cs336_tinystories_sample.txt")
}

/// Stories of a TinyStories-style txt file, trimmed, as `prepare` splits them.
fn txt_stories(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("\n<|endoftext|>\n")
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s != "<|endoftext|>")
        .collect()
}

/// The whole token stream of a split of a prepared dataset.
fn read_split(dir: &Path, split: Split) -> Vec<i64> {
    let ds = Dataset::open(dir).unwrap();
    let s = ds.split(split);
    let mut out = vec![0; s.len() as usize];
    s.read(0, &mut out).unwrap();
    out
}

fn expected_stream(tok: &Tokenizer, stories: &[String]) -> Vec<i64> {
    let mut out = Vec::new();
    for s in stories {
        out.push(i64::from(tok.separator_id()));
        out.extend(tok.encode(s).unwrap().into_iter().map(i64::from));
    }
    out
}

fn args(inputs: &[&Path], val: &[&Path], tokenizer: &Path, out: &Path) -> PrepareArgs {
    let mut a = PrepareArgs::new(
        inputs.iter().map(|p| p.to_path_buf()).collect(),
        tokenizer,
        out,
    );
    a.val = val.iter().map(|p| p.to_path_buf()).collect();
    a
}

#[test]
fn tokenizers_report_vocab_size_separator_and_known_ids() {
    let neox = Tokenizer::from_dir(neox_dir()).unwrap();
    assert_eq!(neox.vocab_size(), 50277);
    assert_eq!(neox.separator_id(), 0);
    assert_eq!(neox.separator_token(), "<|endoftext|>");
    assert_eq!(neox.encode("Hello world").unwrap(), vec![12092, 1533]);
    assert_eq!(neox.decode(&[12092, 1533]).unwrap(), "Hello world");
    assert_eq!(
        neox.sha256(),
        "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"
    );
    let gpt2 = Tokenizer::from_dir(gpt2_dir()).unwrap();
    assert_eq!(gpt2.vocab_size(), 50257);
    assert_eq!(gpt2.separator_id(), 50256);
    assert_eq!(gpt2.encode("Hello world").unwrap(), vec![15496, 995]);
    let text = "Once upon a time, Lily said: \"Wow!\"\n\nThe end.";
    assert_eq!(gpt2.decode(&gpt2.encode(text).unwrap()).unwrap(), text);
}

#[test]
fn bos_with_add_bos_token_in_tokenizer_config_becomes_the_separator() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        gpt2_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let config = dir.path().join("tokenizer_config.json");
    // "!" is id 0 in GPT-2: a BOS distinct from <|endoftext|> shows which rule applied.
    std::fs::write(
        &config,
        r#"{"add_bos_token": true, "bos_token": {"content": "!"}}"#,
    )
    .unwrap();
    assert_eq!(Tokenizer::from_dir(dir.path()).unwrap().separator_id(), 0);
    std::fs::write(&config, r#"{"add_bos_token": false, "bos_token": "!"}"#).unwrap();
    assert_eq!(
        Tokenizer::from_dir(dir.path()).unwrap().separator_id(),
        50256
    );
}

#[test]
fn prepare_txt_writes_separator_then_story_tokens_in_input_order() {
    let out = tempfile::tempdir().unwrap();
    let train = fixture();
    let val = shared_data().join("tinystories/train/tinystories_v1_train_head.txt");
    let report = prepare(&args(&[&train], &[&val], &neox_dir(), out.path())).unwrap();
    let tok = Tokenizer::from_dir(neox_dir()).unwrap();
    let stories = txt_stories(&train);
    assert_eq!(stories.len(), 5);
    assert_eq!(
        read_split(out.path(), Split::Train),
        expected_stream(&tok, &stories)
    );
    assert_eq!(report.index.split(Split::Train).stories, 5);
    assert_eq!(report.index.split(Split::Val).stories, 624);
    assert_eq!(report.index.tokenizer.sha256, tok.sha256());
    assert_eq!(report.index.tokenizer.separator_id, 0);
    assert!(out.path().join(INDEX_FILE).is_file());
    assert!(out.path().join("train-00000.bin").is_file());
}

#[test]
fn json_jsonl_and_tar_gz_inputs_give_the_same_tokens_as_txt() {
    let tmp = tempfile::tempdir().unwrap();
    let stories = txt_stories(&fixture());
    let records: Vec<serde_json::Value> = stories
        .iter()
        .map(
            |s| serde_json::json!({"story": s, "instruction": {"prompt:": "x"}, "source": "GPT-4"}),
        )
        .collect();
    let json = tmp.path().join("data.json");
    std::fs::write(&json, serde_json::to_vec(&records).unwrap()).unwrap();
    let jsonl = tmp.path().join("data.jsonl");
    let mut f = std::fs::File::create(&jsonl).unwrap();
    for s in &stories {
        writeln!(f, "{}", serde_json::json!({ "text": s })).unwrap();
    }
    drop(f);
    let archive = tmp.path().join("data.tar.gz");
    write_tar_gz(
        &archive,
        &[("inner/data.json", std::fs::read(&json).unwrap())],
    );

    let tok = Tokenizer::from_dir(gpt2_dir()).unwrap();
    let want = expected_stream(&tok, &stories);
    for (i, input) in [fixture(), json, jsonl, archive].iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        prepare(&args(&[input], &[&fixture()], &gpt2_dir(), &out)).unwrap();
        assert_eq!(read_split(&out, Split::Train), want, "{}", input.display());
    }
}

fn write_tar_gz(path: &Path, members: &[(&str, Vec<u8>)]) {
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, &bytes[..]).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

#[test]
fn without_val_inputs_the_first_json_of_an_archive_by_name_is_val() {
    let tmp = tempfile::tempdir().unwrap();
    let one = |s: &str| serde_json::to_vec(&serde_json::json!([{ "story": s }])).unwrap();
    let archive = tmp.path().join("TinyStories_all_data.tar.gz");
    // Member order differs from name order; litgpt sorts names and keeps data00.json for val.
    write_tar_gz(
        &archive,
        &[
            ("data02.json", one("Two.")),
            ("data00.json", one("Zero.")),
            ("data01.json", one("One.")),
        ],
    );
    let out = tmp.path().join("out");
    let report = prepare(&args(&[&archive], &[], &gpt2_dir(), &out)).unwrap();
    let tok = Tokenizer::from_dir(gpt2_dir()).unwrap();
    assert_eq!(
        read_split(&out, Split::Val),
        expected_stream(&tok, &["Zero.".into()])
    );
    assert_eq!(
        read_split(&out, Split::Train),
        expected_stream(&tok, &["Two.".into(), "One.".into()])
    );
    assert!(report.auto_val.unwrap().ends_with("data00.json"));
}

#[test]
fn without_val_inputs_the_first_txt_of_a_directory_is_val() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("b.txt"), "Bee.\n<|endoftext|>\n").unwrap();
    std::fs::write(data.join("a.txt"), "Ay.\n<|endoftext|>\n").unwrap();
    std::fs::write(data.join("README.md"), "not data").unwrap();
    let out = tmp.path().join("out");
    let report = prepare(&args(&[&data], &[], &gpt2_dir(), &out)).unwrap();
    assert_eq!(report.index.split(Split::Val).sources.len(), 1);
    assert!(report.index.split(Split::Val).sources[0].ends_with("a.txt"));
    assert!(report.index.split(Split::Train).sources[0].ends_with("b.txt"));
}

#[test]
fn prepare_output_does_not_depend_on_thread_count_and_cuts_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let train = shared_data().join("tinystories/train/tinystories_v1_train_head.txt");
    let mut index = Vec::new();
    for threads in [1, 2] {
        let out = tmp.path().join(format!("t{threads}"));
        let mut a = args(&[&train], &[&fixture()], &neox_dir(), &out);
        a.threads = threads;
        a.shard_tokens = 50_000;
        index.push(prepare(&a).unwrap().index);
    }
    let train_split = index[0].split(Split::Train);
    assert!(train_split.shards.len() >= 2, "{train_split:?}");
    assert!(train_split.shards.iter().all(|s| s.tokens <= 50_000));
    assert_eq!(index[0], index[1]);
}

#[test]
fn missing_input_is_a_one_line_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.txt");
    let e = prepare(&args(&[&missing], &[], &gpt2_dir(), &tmp.path().join("o"))).unwrap_err();
    assert!(matches!(e, DataError::MissingInput { .. }));
    assert_eq!(
        e.to_string(),
        format!("input not found: {}", missing.display())
    );
    let no_tok = tmp.path().join("no-tok");
    let e = prepare(&args(&[&fixture()], &[], &no_tok, &tmp.path().join("o"))).unwrap_err();
    assert!(matches!(e, DataError::Tokenizer { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("tokenizer {}: directory not found", no_tok.display())
    );
}

#[test]
fn empty_file_and_file_without_stories_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("empty.txt", ""),
        ("only-separators.txt", "<|endoftext|>\n\n<|endoftext|>\n"),
        ("empty.jsonl", ""),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        let e = prepare(&args(
            &[&p],
            &[&fixture()],
            &gpt2_dir(),
            &tmp.path().join("o"),
        ))
        .unwrap_err();
        assert!(matches!(e, DataError::NoStories { .. }), "{e}");
        assert_eq!(e.to_string(), format!("no stories in {}", p.display()));
    }
    let empty_dir = tmp.path().join("empty-dir");
    std::fs::create_dir(&empty_dir).unwrap();
    let e = prepare(&args(
        &[&empty_dir],
        &[],
        &gpt2_dir(),
        &tmp.path().join("o"),
    ))
    .unwrap_err();
    assert!(matches!(e, DataError::NoStories { .. }), "{e}");
    assert!(!tmp.path().join("o").join(INDEX_FILE).exists());
}

#[test]
fn non_utf8_text_is_an_error_naming_file_and_byte_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("latin1.txt");
    std::fs::write(&p, b"Once upon a time.\n<|endoftext|>\nCaf\xe9 time.\n").unwrap();
    let e = prepare(&args(
        &[&p],
        &[&fixture()],
        &gpt2_dir(),
        &tmp.path().join("o"),
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: not valid UTF-8 at byte offset 35", p.display())
    );
}

#[test]
fn unsupported_input_and_bad_jsonl_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("stories.csv");
    std::fs::write(&p, "a,b").unwrap();
    let e = prepare(&args(&[&p], &[], &gpt2_dir(), &tmp.path().join("o"))).unwrap_err();
    assert!(matches!(e, DataError::UnsupportedInput { .. }), "{e}");
    let p = tmp.path().join("s.jsonl");
    std::fs::write(&p, "{\"story\": \"ok\"}\n{\"title\": \"no story\"}\n").unwrap();
    let e = prepare(&args(
        &[&p],
        &[&fixture()],
        &gpt2_dir(),
        &tmp.path().join("o"),
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:2: object has neither a `story` nor a `text` field",
            p.display()
        )
    );
}

#[test]
fn output_inside_the_input_directory_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(fixture(), data.join("a.txt")).unwrap();
    let out = data.join("prepared");
    let e = prepare(&args(&[&data], &[&fixture()], &gpt2_dir(), &out)).unwrap_err();
    assert!(matches!(e, DataError::OutputInsideInput { .. }), "{e}");
    assert!(!out.exists());
}

#[test]
fn existing_dataset_is_kept_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let mut a = args(&[&fixture()], &[&fixture()], &gpt2_dir(), &out);
    prepare(&a).unwrap();
    let e = prepare(&a).unwrap_err();
    assert!(matches!(e, DataError::OutputExists { .. }), "{e}");
    a.overwrite = true;
    prepare(&a).unwrap();
}

#[test]
fn tokenizer_vocabulary_larger_than_the_model_is_rejected() {
    let tok = Tokenizer::from_dir(neox_dir()).unwrap();
    check_vocab(&tok, 50304).unwrap();
    let e = check_vocab(&tok, 50000).unwrap_err();
    assert!(matches!(e, DataError::VocabTooLarge { .. }));
    assert!(
        e.to_string()
            .ends_with("vocabulary of 50277 tokens exceeds the model's padded_vocab_size 50000"),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    prepare(&args(&[&fixture()], &[&fixture()], &neox_dir(), &out)).unwrap();
    let ds = Dataset::open(&out).unwrap();
    check_vocab(&ds, 50304).unwrap();
    let e = check_vocab(&ds, 50257).unwrap_err().to_string();
    assert!(e.starts_with("dataset ") && e.contains("50277"), "{e}");
}

/// `mla prepare INPUT --tokenizer-dir <gpt2> --quiet`, then `extra`.
fn mla_prepare(input: &Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec![
        "prepare",
        input.to_str().unwrap(),
        "--tokenizer-dir",
        gpt2_dir().to_str().unwrap(),
        "--quiet",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    a.extend(extra.iter().map(|s| s.to_string()));
    mla(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Bad input named on the last line, with the OS error (if any) once, not once per error source.
fn assert_bad_once(out: &std::process::Output, culprits: &[&str]) -> String {
    let last = assert_bad(out, culprits);
    assert!(last.matches("os error").count() <= 1, "{last}");
    last
}

#[test]
fn out_that_is_a_file_or_under_a_file_is_bad_input_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let f = file.to_str().unwrap();
    let out = mla_prepare(&fixture(), &["--out", f]);
    assert_bad_once(&out, &[f, "not a directory"]);
    // A path under a file cannot be created by anyone, root included: the read-only case that
    // a test running as root can reach (mode 0o555 does not stop root; see prepare.rs's tests).
    let sub = file.join("sub");
    let out = mla_prepare(&fixture(), &["--out", sub.to_str().unwrap()]);
    assert_bad_once(&out, &[&format!("{f} is not a directory")]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
}

#[test]
fn shard_tokens_below_the_minimum_is_bad_input_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("o");
    let out = mla_prepare(
        &fixture(),
        &["--out", o.to_str().unwrap(), "--shard-tokens", "1"],
    );
    assert_bad(&out, &["--shard-tokens", "65536"]);
    assert!(!o.exists(), "nothing written");
}

/// A gzip stream of `members` cut to half its length.
fn truncated_tar_gz(path: &Path, members: &[(&str, Vec<u8>)]) {
    write_tar_gz(path, members);
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

#[test]
fn truncated_tar_gz_is_bad_input_naming_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read(shared_data().join("tinystories/train/tinystories_v1_train_head.txt"))
        .unwrap();
    let archive = tmp.path().join("data.tar.gz");
    truncated_tar_gz(
        &archive,
        &[("a.txt", text.clone()), ("b.txt", text.clone())],
    );
    let o = tmp.path().join("o");
    // With --val the archive is read once; without, it is listed first to choose val data.
    for val in [&[&fixture() as &Path][..], &[]] {
        let e = prepare(&args(&[&archive], val, &gpt2_dir(), &o)).unwrap_err();
        assert!(matches!(e, DataError::BadArchive { .. }), "{e}");
        assert!(e.is_bad_input());
        assert!(e.to_string().contains(archive.to_str().unwrap()), "{e}");
        assert!(!o.join(INDEX_FILE).exists());
    }
    let out = mla_prepare(&archive, &["--out", o.to_str().unwrap()]);
    assert_bad_once(&out, &[archive.to_str().unwrap(), "truncated or corrupt"]);
}

#[test]
fn directory_symlink_loop_is_bad_input_naming_the_link() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::copy(fixture(), data.join("a.txt")).unwrap();
    let link = data.join("sub/back");
    std::os::unix::fs::symlink("..", &link).unwrap();
    let o = tmp.path().join("o");
    let e = prepare(&args(&[&data], &[&fixture()], &gpt2_dir(), &o)).unwrap_err();
    assert!(matches!(e, DataError::SymlinkLoop { .. }), "{e}");
    let out = mla_prepare(&data, &["--out", o.to_str().unwrap()]);
    assert_bad_once(&out, &[link.to_str().unwrap(), "symlink loop"]);
    assert!(!o.exists());
    // Symlinks that only point at each other (the OS reports ELOOP).
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("y", data.join("x")).unwrap();
    std::os::unix::fs::symlink("x", data.join("y")).unwrap();
    let e = prepare(&args(&[&data], &[&fixture()], &gpt2_dir(), &o)).unwrap_err();
    assert!(matches!(e, DataError::SymlinkLoop { .. }), "{e}");
    assert!(e.is_bad_input());
}

#[test]
fn directory_symlinks_are_followed_inside_the_input_only() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(fixture(), data.join("sub/in.txt")).unwrap();
    std::fs::copy(fixture(), outside.join("secret.txt")).unwrap();
    std::os::unix::fs::symlink(&outside, data.join("away")).unwrap();
    std::os::unix::fs::symlink("sub", data.join("alias")).unwrap();
    // A file symlink is read wherever it points.
    std::os::unix::fs::symlink(outside.join("secret.txt"), data.join("file-link.txt")).unwrap();
    let report = prepare(&args(
        &[&data],
        &[&fixture()],
        &gpt2_dir(),
        &tmp.path().join("o"),
    ))
    .unwrap();
    let sources = &report.index.split(Split::Train).sources;
    let want: Vec<String> = ["alias/in.txt", "file-link.txt", "sub/in.txt"]
        .iter()
        .map(|f| data.join(f).display().to_string())
        .collect();
    assert_eq!(sources, &want);
}

#[test]
fn tokenizer_dir_problems_are_named_as_tokenizer_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("o");
    let o = o.to_str().unwrap();
    let run = |dir: &Path| {
        mla(&[
            "prepare",
            fixture().to_str().unwrap(),
            "--tokenizer-dir",
            dir.to_str().unwrap(),
            "--out",
            o,
        ])
    };
    let missing = tmp.path().join("nonexistent");
    let last = assert_bad(&run(&missing), &[missing.to_str().unwrap(), "tokenizer"]);
    assert!(
        last.contains("directory not found") && !last.contains("input"),
        "{last}"
    );

    let not_a_tokenizer = tmp.path().join("json");
    std::fs::create_dir(&not_a_tokenizer).unwrap();
    let json = not_a_tokenizer.join("tokenizer.json");
    std::fs::write(&json, r#"{"a": 1}"#).unwrap();
    let last = assert_bad(&run(&not_a_tokenizer), &[json.to_str().unwrap()]);
    assert!(
        last.contains("valid JSON but not a Hugging Face tokenizer.json"),
        "{last}"
    );
    std::fs::write(&json, r#"{"model": "#).unwrap();
    assert_bad(&run(&not_a_tokenizer), &["not valid JSON"]);
    std::fs::remove_file(&json).unwrap();
    assert_bad(
        &run(&not_a_tokenizer),
        &[json.to_str().unwrap(), "not found"],
    );
}

#[test]
fn malformed_jsonl_line_names_the_file_line_once() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("s.jsonl");
    std::fs::write(&p, "{\"story\": \"ok\"}\n{\"story\": \"cut off\n").unwrap();
    let out = mla_prepare(
        &p,
        &[
            "--val",
            fixture().to_str().unwrap(),
            "--out",
            tmp.path().join("o").to_str().unwrap(),
        ],
    );
    let last = assert_bad(&out, &[&format!("{}:2: ", p.display())]);
    assert!(!last.contains("column"), "{last}");
}

#[test]
fn eval_of_raw_text_names_the_text_not_its_temp_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    common::ok(&common::train(
        tmp.path(),
        run.to_str().unwrap(),
        &["--train.max_steps", "1"],
        &[],
    ));
    // One short story: fewer tokens than one window of the model's block size.
    let text = tmp.path().join("short.txt");
    std::fs::write(&text, "Once upon a time.\n").unwrap();
    let out = mla(&[
        "eval",
        run.join("final").to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_bad(&out, &[&format!("val split of {} has", text.display())]);
}

/// SIGTERM while `mla prepare` tokenizes: it stops within seconds, says so, and leaves no
/// dataset (no index.json, no shards).
#[test]
fn sigterm_stops_prepare_promptly_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // 100 links to the 3.5 MB sample: 350 MB, far more than the seconds this test waits.
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let sample = shared_data().join("tinystories/train/tinystories_random_sample_00.txt");
    for i in 0..100 {
        std::os::unix::fs::symlink(&sample, data.join(format!("{i:02}.txt"))).unwrap();
    }
    let o = tmp.path().join("o");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mla"))
        .args([
            "prepare",
            data.to_str().unwrap(),
            "--val",
            fixture().to_str().unwrap(),
            "--tokenizer-dir",
            gpt2_dir().to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
            "--shard-tokens",
            "65536",
            "--quiet",
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until tokenization is under way: the first shard is written.
    let started = Instant::now();
    while !o.join("train-00000.bin").exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "mla prepare ended early"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no shard after 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let signalled = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("mla prepare still running 30 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stop_secs = signalled.elapsed().as_secs_f64();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    println!("stopped {stop_secs:.2} s after SIGTERM (bound 10 s)");
    assert!(stop_secs < 10.0, "stopped only after {stop_secs:.1} s");
    assert_eq!(status.code(), Some(1), "{status:?}: {err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "error: stopped by a signal during data preparation; nothing was prepared"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!o.join(INDEX_FILE).exists());
    let left: Vec<_> = std::fs::read_dir(&o)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Throughput on all of `../shared/data` TinyStories (13 MB): run with
/// `cargo test --release -p mla-trainer --test data_prepare -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, not a check; takes tens of seconds"]
fn prepare_shared_tinystories_throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let ts = shared_data().join("tinystories");
    let mut a = args(
        &[&ts.join("train")],
        &[&ts.join("valid")],
        &neox_dir(),
        tmp.path(),
    );
    a.quiet = false;
    let report = prepare(&a).unwrap();
    println!("{report}");
    println!("input bytes {}", report.input_bytes);
}

/// The 624 stories of the v1 train head: several Parquet row groups of 100 rows.
fn head_stories() -> Vec<String> {
    txt_stories(&shared_data().join("tinystories/train/tinystories_v1_train_head.txt"))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn jsonl(stories: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in stories {
        writeln!(out, "{}", serde_json::json!({ "text": s })).unwrap();
    }
    out
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The project's .venv python when it can import pyarrow; None (after a note) otherwise, a
/// failure under CI.
fn python_with_pyarrow() -> Option<PathBuf> {
    let python = repo().join(".venv/bin/python");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import pyarrow.parquet"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    let why = format!(
        "{} cannot import pyarrow (scripts/setup.sh installs it)",
        python.display()
    );
    assert!(!in_ci(), "{why} (required under CI)");
    eprintln!("note: {why}; skipping the pyarrow-written Parquet inputs");
    None
}

/// Parquet files written by pyarrow, as the `datasets` library writes them, from the stories in
/// `stories_json`: `hf.parquet` (snappy, row groups of 100, `id`, `text` with a null, and a
/// `meta` column after it) and `story.parquet` (zstd, large_string `story` only, data pages v2).
const PYARROW_WRITER: &str = r#"
import json, sys
import pyarrow as pa, pyarrow.parquet as pq
stories = json.load(open(sys.argv[1]))
out = sys.argv[2]
text = stories[:7] + [None] + stories[7:]
pq.write_table(
    pa.table({"id": list(range(len(text))), "text": text, "meta": ["m"] * len(text)}),
    out + "/hf.parquet", compression="snappy", row_group_size=100)
pq.write_table(
    pa.table({"story": pa.array(stories, type=pa.large_string())}),
    out + "/story.parquet", compression="zstd", row_group_size=250, data_page_version="2.0")
"#;

#[test]
fn compressed_and_parquet_inputs_give_the_same_tokens_as_txt() {
    let tmp = tempfile::tempdir().unwrap();
    let stories = head_stories();
    assert_eq!(stories.len(), 624);
    let records: Vec<serde_json::Value> = stories
        .iter()
        .map(
            |s| serde_json::json!({"story": s, "instruction": {"words": ["a"]}, "source": "GPT-4"}),
        )
        .collect();
    let txt = shared_data().join("tinystories/train/tinystories_v1_train_head.txt");
    let mut inputs = vec![txt.clone()];
    let mut file = |name: &str, bytes: Vec<u8>| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        inputs.push(p);
    };
    file("data.json.gz", gzip(&serde_json::to_vec(&records).unwrap()));
    file("data.jsonl.gz", gzip(&jsonl(&stories)));
    file(
        "data.jsonl.zst",
        zstd::stream::encode_all(&jsonl(&stories)[..], 3).unwrap(),
    );
    file(
        "data.txt.zst",
        zstd::stream::encode_all(&std::fs::read(&txt).unwrap()[..], 3).unwrap(),
    );
    let rust_parquet = tmp.path().join("rust.parquet");
    write_parquet(&rust_parquet, "text", &stories);
    inputs.push(rust_parquet);
    let rust_story = tmp.path().join("rust-story.parquet");
    write_parquet(&rust_story, "story", &stories);
    inputs.push(rust_story);
    if let Some(python) = python_with_pyarrow() {
        let list = tmp.path().join("stories.json");
        std::fs::write(&list, serde_json::to_vec(&stories).unwrap()).unwrap();
        let out = std::process::Command::new(python)
            .args(["-c", PYARROW_WRITER])
            .arg(&list)
            .arg(tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        inputs.push(tmp.path().join("hf.parquet"));
        inputs.push(tmp.path().join("story.parquet"));
    }

    let tok = Tokenizer::from_dir(gpt2_dir()).unwrap();
    let want = expected_stream(&tok, &stories);
    for (i, input) in inputs.iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        let report = prepare(&args(&[input], &[&fixture()], &gpt2_dir(), &out)).unwrap();
        assert_eq!(read_split(&out, Split::Train), want, "{}", input.display());
        assert_eq!(report.index.split(Split::Train).stories, 624);
        // Progress counts what was read from disk: all of it, compressed.
        let on_disk =
            std::fs::metadata(input).unwrap().len() + std::fs::metadata(fixture()).unwrap().len();
        assert_eq!(report.input_bytes, on_disk, "{}", input.display());
    }
}

#[test]
fn text_column_names_the_parquet_column_to_read() {
    let tmp = tempfile::tempdir().unwrap();
    let stories = head_stories();
    let p = tmp.path().join("data.parquet");
    write_parquet(&p, "content", &stories[..10]);
    let mut a = args(&[&p], &[&fixture()], &gpt2_dir(), &tmp.path().join("o"));
    a.text_column = Some("content".into());
    prepare(&a).unwrap();
    let tok = Tokenizer::from_dir(gpt2_dir()).unwrap();
    assert_eq!(
        read_split(&tmp.path().join("o"), Split::Train),
        expected_stream(&tok, &stories[..10])
    );
    // Through the binary too.
    let o = tmp.path().join("o2");
    let out = mla_prepare(
        &p,
        &[
            "--text-column",
            "content",
            "--val",
            fixture().to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ],
    );
    common::ok(&out);
    assert!(o.join(INDEX_FILE).is_file());
}

#[test]
fn a_hugging_face_parquet_directory_keeps_its_validation_file_for_val() {
    let tmp = tempfile::tempdir().unwrap();
    let stories = head_stories();
    let data = tmp.path().join("dataset/data");
    std::fs::create_dir_all(&data).unwrap();
    write_parquet(
        &data.join("train-00000-of-00002.parquet"),
        "text",
        &stories[..300],
    );
    write_parquet(
        &data.join("train-00001-of-00002.parquet"),
        "text",
        &stories[300..600],
    );
    write_parquet(
        &data.join("validation-00000-of-00001.parquet"),
        "text",
        &stories[600..],
    );
    std::fs::write(
        data.join("extra.jsonl.zst"),
        zstd::stream::encode_all(&jsonl(&stories[..2])[..], 1).unwrap(),
    )
    .unwrap();
    std::fs::write(data.join("README.md"), "not data").unwrap();
    let out = tmp.path().join("o");
    let report = prepare(&args(
        &[&tmp.path().join("dataset")],
        &[],
        &gpt2_dir(),
        &out,
    ))
    .unwrap();
    assert!(report
        .auto_val
        .unwrap()
        .ends_with("validation-00000-of-00001.parquet"));
    let val = report.index.split(Split::Val);
    assert_eq!(val.stories, 24);
    let train_split = report.index.split(Split::Train);
    let train: Vec<&str> = train_split
        .sources
        .iter()
        .map(|s| s.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        train,
        [
            "extra.jsonl.zst",
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet"
        ]
    );
    assert_eq!(train_split.stories, 602);
}

/// `mla prepare BAD --val <fixture> --out o [extra]` is bad input naming `culprits` and leaves
/// nothing at `o`.
fn assert_bad_input_file(tmp: &Path, bad: &Path, extra: &[&str], culprits: &[&str]) -> String {
    let o = tmp.join("o");
    let val = fixture();
    let mut a = vec!["--val", val.to_str().unwrap(), "--out", o.to_str().unwrap()];
    a.extend_from_slice(extra);
    let out = mla_prepare(bad, &a);
    let mut names = vec![bad.to_str().unwrap()];
    names.extend_from_slice(culprits);
    let last = assert_bad_once(&out, &names);
    assert!(!o.exists(), "{} left behind", o.display());
    last
}

#[test]
fn corrupt_parquet_and_missing_text_column_are_bad_input_naming_file_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let stories = head_stories();
    let good = tmp.path().join("good.parquet");
    write_parquet(&good, "text", &stories);

    let garbage = tmp.path().join("garbage.parquet");
    std::fs::write(
        &garbage,
        "Once upon a time there was no Parquet here.\n".repeat(20),
    )
    .unwrap();
    assert_bad_input_file(
        tmp.path(),
        &garbage,
        &[],
        &["not a Parquet file, or truncated or corrupt"],
    );

    let cut = tmp.path().join("cut.parquet");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_bad_input_file(tmp.path(), &cut, &[], &["truncated or corrupt"]);

    // The footer is intact but a page is not: cut out of the middle of the first pages.
    let holed = tmp.path().join("holed.parquet");
    let mut bytes = bytes.clone();
    bytes[100..4000].fill(0xff);
    std::fs::write(&holed, &bytes).unwrap();
    assert_bad_input_file(tmp.path(), &holed, &[], &["truncated or corrupt"]);

    assert_bad_input_file(
        tmp.path(),
        &good,
        &["--text-column", "body"],
        &["no column `body`", "`id`, `text`"],
    );
    assert_bad_input_file(
        tmp.path(),
        &good,
        &["--text-column", "id"],
        &["column `id`", "not strings"],
    );
    let other = tmp.path().join("other.parquet");
    write_parquet(&other, "content", &stories[..3]);
    assert_bad_input_file(
        tmp.path(),
        &other,
        &[],
        &["no `text` or `story` column", "`content`", "--text-column"],
    );

    // The library reports the same error as a DataError.
    let e = prepare(&args(
        &[&garbage],
        &[&fixture()],
        &gpt2_dir(),
        &tmp.path().join("o"),
    ))
    .unwrap_err();
    assert!(
        matches!(e, DataError::BadParquet { .. }) && e.is_bad_input(),
        "{e}"
    );
}

#[test]
fn non_utf8_parquet_value_is_bad_input_naming_the_row() {
    use parquet::data_type::ByteArray;
    use parquet::file::writer::SerializedFileWriter;
    let tmp = tempfile::tempdir().unwrap();
    // Declared a string column, but the second value is Latin-1.
    let p = tmp.path().join("latin1.parquet");
    let schema =
        parquet::schema::parser::parse_message_type("message m { required binary text (STRING); }")
            .unwrap();
    let mut w = SerializedFileWriter::new(
        std::fs::File::create(&p).unwrap(),
        schema.into(),
        Default::default(),
    )
    .unwrap();
    let mut group = w.next_row_group().unwrap();
    let mut col = group.next_column().unwrap().unwrap();
    col.typed::<parquet::data_type::ByteArrayType>()
        .write_batch(
            &[
                ByteArray::from("Once upon a time."),
                ByteArray::from(b"Caf\xe9 time.".to_vec()),
            ],
            None,
            None,
        )
        .unwrap();
    col.close().unwrap();
    group.close().unwrap();
    w.close().unwrap();
    assert_bad_input_file(
        tmp.path(),
        &p,
        &[],
        &["column `text`, row 1: not valid UTF-8 at byte 3"],
    );
}

#[test]
fn truncated_gzip_and_zstd_files_are_bad_input_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let text = jsonl(&head_stories());
    for (name, bytes, codec) in [
        ("cut.jsonl.gz", gzip(&text), "gzip"),
        (
            "cut.jsonl.zst",
            zstd::stream::encode_all(&text[..], 3).unwrap(),
            "zstd",
        ),
        (
            "cut.json.gz",
            gzip(
                &serde_json::to_vec(
                    &head_stories()
                        .iter()
                        .map(|s| serde_json::json!({"story": s}))
                        .collect::<Vec<_>>(),
                )
                .unwrap(),
            ),
            "gzip",
        ),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert_bad_input_file(
            tmp.path(),
            &p,
            &[],
            &[&format!("truncated or corrupt {codec} stream")],
        );
        // Not compressed at all.
        std::fs::write(&p, &text).unwrap();
        assert_bad_input_file(
            tmp.path(),
            &p,
            &[],
            &[&format!("truncated or corrupt {codec} stream")],
        );
    }
}

/// `files` .txt files of `per_file` consecutive stories each, cut from the shared v1 train head,
/// in `<tmp>/parts` (named so that sorted order is cut order).
fn story_files(tmp: &Path, files: usize, per_file: usize) -> PathBuf {
    let dir = tmp.join("parts");
    std::fs::create_dir_all(&dir).unwrap();
    let stories = head_stories();
    for (i, chunk) in stories.chunks(per_file).take(files).enumerate() {
        let text: String = chunk
            .iter()
            .map(|s| format!("{s}\n<|endoftext|>\n"))
            .collect();
        std::fs::write(dir.join(format!("part{i:02}.txt")), text).unwrap();
    }
    dir
}

/// Run `workers` library workers with `base`'s inputs into `out`, the last first (the order in
/// which workers finish does not matter).
fn prepare_as_workers(base: &PrepareArgs, out: &Path, workers: u32) -> Vec<String> {
    let mut lines = Vec::new();
    for i in (0..workers).rev() {
        let mut a = base.clone();
        a.out = Some(out.to_path_buf());
        a.worker = Some(format!("{i}/{workers}"));
        let report = prepare(&a).unwrap();
        assert_eq!(report.worker.unwrap().index, i);
        lines.push(report.to_string());
    }
    lines
}

/// The merged dataset in `dir` has the single run's streams, counts and sources (shard
/// boundaries may differ) and only worker-named shards.
fn assert_same_dataset(dir: &Path, single: &Path) {
    let want = Dataset::open(single).unwrap();
    let got = Dataset::open(dir).unwrap();
    for split in [Split::Train, Split::Val] {
        assert_eq!(read_split(dir, split), read_split(single, split), "{split}");
        let (g, w) = (got.index().split(split), want.index().split(split));
        assert_eq!(
            (g.tokens, g.stories, &g.sources),
            (w.tokens, w.stories, &w.sources),
            "{split} of {}",
            dir.display()
        );
        assert!(g.shards.iter().all(|s| s.file.contains("-w")), "{g:?}");
        assert_eq!(got.split(split).len(), w.tokens);
    }
    assert_eq!(got.index().tokenizer, want.index().tokenizer);
    assert_eq!(got.index().dtype, want.index().dtype);
}

#[test]
fn workers_then_merge_give_the_single_runs_token_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = story_files(tmp.path(), 5, 40);
    let single = tmp.path().join("single");
    let mut base = args(&[&parts], &[], &gpt2_dir(), &single);
    base.shard_tokens = 3000; // several shards per worker and split
    let report = prepare(&base).unwrap();
    assert!(report.auto_val.as_deref().unwrap().ends_with("part00.txt"));
    assert_eq!(report.index.split(Split::Train).sources.len(), 4);
    for workers in [1, 2, 3, 7] {
        let dir = tmp.path().join(format!("w{workers}"));
        let lines = prepare_as_workers(&base, &dir, workers);
        assert!(
            !dir.join(INDEX_FILE).exists(),
            "workers write no index.json"
        );
        // 5 jobs for 7 workers: workers 0 and 3 get none (floor(i*5/7)).
        let empty = lines
            .iter()
            .filter(|l| l.contains("wrote an empty partial index"))
            .count();
        assert_eq!(empty, if workers == 7 { 2 } else { 0 }, "{lines:#?}");
        assert!(
            lines.iter().all(|l| l.contains(&format!(
                "when all {workers} workers are done: mla prepare --merge {}",
                dir.display()
            ))),
            "{lines:#?}"
        );
        let merged = merge(&dir, false, None).unwrap();
        assert_eq!(merged.workers, workers);
        assert_same_dataset(&dir, &single);
        let on_disk = DatasetIndex::from_json(
            &std::fs::read(dir.join(INDEX_FILE)).unwrap(),
            &dir.join(INDEX_FILE),
        )
        .unwrap();
        assert_eq!(on_disk, merged.index);
    }
}

#[test]
fn mla_prepare_workers_and_merge_match_a_single_run_with_val() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = story_files(tmp.path(), 5, 30);
    let val = fixture();
    let single = tmp.path().join("single");
    prepare(&args(&[&parts], &[&val], &gpt2_dir(), &single)).unwrap();
    let dir = tmp.path().join("shared");
    let d = dir.to_str().unwrap();
    for w in ["1/2", "0/2"] {
        let out = ok(&mla_prepare(
            &parts,
            &["--val", val.to_str().unwrap(), "--out", d, "--worker", w],
        ));
        assert!(
            out.starts_with(&format!("worker {w} ")) && out.contains("mla prepare --merge"),
            "{out}"
        );
        assert!(dir
            .join(format!("index-worker-000{}.json", &w[..1]))
            .is_file());
    }
    // The val job comes last in the plan: worker 1 (jobs 3..6) has it.
    assert!(dir.join("val-w0001-00000.bin").is_file());
    assert!(!dir.join("val-w0000-00000.bin").exists());
    let out = ok(&mla(&["prepare", "--merge", d]));
    assert!(
        out.starts_with(&format!("merged 2 workers into {d}: train ")),
        "{out}"
    );
    assert_same_dataset(&dir, &single);
    // A merged dataset is kept unless --overwrite; then the merge is repeated.
    assert_bad(
        &mla(&["prepare", "--merge", d]),
        &["index.json", "--overwrite"],
    );
    ok(&mla(&["prepare", "--merge", d, "--overwrite"]));
    assert_same_dataset(&dir, &single);
    // A worker run again is refused on its own partial index only.
    let again = mla_prepare(
        &parts,
        &[
            "--val",
            val.to_str().unwrap(),
            "--out",
            d,
            "--worker",
            "0/2",
        ],
    );
    assert_bad(&again, &["index-worker-0000.json", "already exists"]);
}

/// Worker `w` of `parts` into `dir` through the binary, with `tokenizer`.
fn mla_worker(parts: &Path, dir: &Path, w: &str, tokenizer: &Path) {
    ok(&mla(&[
        "prepare",
        parts.to_str().unwrap(),
        "--tokenizer-dir",
        tokenizer.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--worker",
        w,
        "--quiet",
    ]));
}

#[test]
fn merge_refuses_a_missing_or_disagreeing_worker_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = story_files(tmp.path(), 3, 2);
    let merge_of = |dir: &Path| mla(&["prepare", "--merge", dir.to_str().unwrap()]);

    // Worker 1 of 3 has not finished.
    let missing = tmp.path().join("missing");
    mla_worker(&parts, &missing, "0/3", &gpt2_dir());
    mla_worker(&parts, &missing, "2/3", &gpt2_dir());
    let name = missing.join("index-worker-0001.json");
    assert_bad(
        &merge_of(&missing),
        &[name.to_str().unwrap(), "not found", "worker 1/3"],
    );
    assert!(!missing.join(INDEX_FILE).exists());
    // Nothing prepared there at all.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_bad(&merge_of(&empty), &["index-worker-0000.json", "not found"]);
    assert_bad(
        &merge_of(&tmp.path().join("nowhere")),
        &["nowhere", "not a directory"],
    );

    // Another tokenizer.
    let tokenizers = tmp.path().join("tokenizers");
    mla_worker(&parts, &tokenizers, "0/2", &gpt2_dir());
    mla_worker(&parts, &tokenizers, "1/2", &neox_dir());
    assert_bad(
        &merge_of(&tokenizers),
        &["index-worker-0001.json", "worker 1", "tokenizer sha256"],
    );
    assert!(!tokenizers.join(INDEX_FILE).exists());

    // Another number of workers.
    let counts = tmp.path().join("counts");
    mla_worker(&parts, &counts, "0/2", &gpt2_dir());
    mla_worker(&parts, &counts, "1/3", &gpt2_dir());
    assert_bad(
        &merge_of(&counts),
        &["index-worker-0001.json", "worker 1", "workers: 3 here, 2"],
    );
    assert!(!counts.join(INDEX_FILE).exists());

    // --tokenizer-dir with --merge checks the workers' tokenizer.
    let same = tmp.path().join("same");
    mla_worker(&parts, &same, "0/1", &gpt2_dir());
    let s = same.to_str().unwrap();
    let neox = neox_dir();
    let other = mla(&[
        "prepare",
        "--merge",
        s,
        "--tokenizer-dir",
        neox.to_str().unwrap(),
    ]);
    assert_bad(&other, &["index-worker-0000.json", "--tokenizer-dir"]);
    ok(&mla(&[
        "prepare",
        "--merge",
        s,
        "--tokenizer-dir",
        gpt2_dir().to_str().unwrap(),
    ]));
    assert_eq!(
        Dataset::open(&same)
            .unwrap()
            .index()
            .split(Split::Train)
            .stories,
        4
    );
}

#[test]
fn bad_worker_values_are_one_line_errors_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("o");
    for bad in ["2/2", "a/b", "0/0", "1", "0/2/3", "1/-2"] {
        let out = mla_prepare(&fixture(), &["--out", o.to_str().unwrap(), "--worker", bad]);
        assert_bad(&out, &["--worker", bad]);
        assert!(!o.exists(), "nothing written for {bad}");
    }
    let mut a = args(&[&fixture()], &[], &gpt2_dir(), &o);
    a.worker = Some("3/3".into());
    let e = prepare(&a).unwrap_err();
    assert!(matches!(e, DataError::InvalidOption { .. }), "{e}");
    assert!(!o.exists());
}

#[test]
fn workers_and_merge_on_an_object_store_need_no_listing() {
    use mla_storage::object_store::memory::InMemory;
    use mla_trainer::data::{merge_in, prepare_into, RemoteDir, ShardSink};
    let tmp = tempfile::tempdir().unwrap();
    let parts = story_files(tmp.path(), 4, 10);
    let single = tmp.path().join("single");
    prepare(&args(&[&parts], &[], &gpt2_dir(), &single)).unwrap();
    let store = Arc::new(InMemory::new());
    let opts = mla_storage::StoreOptions::from_env().unwrap();
    let remote = RemoteDir::from_object_store(store, "data/ts", "memory:///data/ts", opts).unwrap();
    let tokenizer = Tokenizer::from_dir(gpt2_dir()).unwrap();
    for w in ["2/3", "0/3"] {
        let mut a = args(&[&parts], &[], &gpt2_dir(), Path::new("unused"));
        a.worker = Some(w.into());
        prepare_into(&a, &tokenizer, &remote).unwrap();
    }
    let e = merge_in(&remote, false, None).unwrap_err().to_string();
    assert!(
        e.contains("memory:///data/ts/index-worker-0001.json: not found"),
        "{e}"
    );
    assert!(!remote.exists(INDEX_FILE).unwrap());
    let mut a = args(&[&parts], &[], &gpt2_dir(), Path::new("unused"));
    a.worker = Some("1/3".into());
    prepare_into(&a, &tokenizer, &remote).unwrap();
    let report = merge_in(&remote, false, Some(&tokenizer.info())).unwrap();
    assert_eq!(report.workers, 3);
    let ds = Dataset::open_with(Arc::new(remote), Default::default()).unwrap();
    for split in [Split::Train, Split::Val] {
        let s = ds.split(split);
        let mut got = vec![0; s.len() as usize];
        s.read(0, &mut got).unwrap();
        assert_eq!(got, read_split(&single, split), "{split}");
    }
}

/// `--merge` takes no tokenizing flag: one it would silently ignore is refused (exit 2).
#[test]
fn merge_refuses_the_flags_it_would_ignore() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    for flag in [
        ["--shard-tokens", "65536"],
        ["--threads", "1"],
        ["--text-column", "x"],
    ] {
        let out = mla(&["prepare", "--merge", dir, flag[0], flag[1]]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag:?}: {err}");
        assert!(
            err.contains(&format!("cannot be used with '{}", flag[0])),
            "{err}"
        );
    }
}
