//! The study runner behind `mla study STUDY.yaml`: a base run config and a list of variants,
//! each a set of overrides deep-merged over the base, trained one after another under the
//! same data, seed, token budget, optimizer and schedule; then the report over the finished
//! ones.
//!
//! ```yaml
//! out_dir: out/study/tiny        # each variant trains into out_dir/<name>
//! base: { …a full run config… }  # inline, or a config file: base: config_hub/pretrain/cfg.yaml
//! variants:
//!   - name: mha
//!     overrides: { model_config: { latent_attention: false } }
//! ```
//! Each variant runs as its own `mla train` process (`--resume auto`): a finished variant
//! (its `final` checkpoint is committed) is skipped on a rerun, an interrupted one resumes,
//! and a failed one is reported without stopping the others.
//! Not here: training (train/), the report (report/table.rs, report/plot.rs).

use crate::config::{Override, RunConfig};
use crate::error::BadInput;
use anyhow::Context;
use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};
use std::path::{Path, PathBuf};

/// A study file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyFile {
    /// Shown in the report's title (default: the file's stem).
    #[serde(default)]
    pub name: Option<String>,
    /// Local directory: variant `v` trains into `out_dir/v`, the report goes to
    /// `out_dir/report`.
    pub out_dir: String,
    /// The run config every variant starts from: inline, or the path of a config file
    /// (relative to the current directory, as the paths inside configs are).
    pub base: Base,
    pub variants: Vec<VariantSpec>,
}

/// `base:` of a study file.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Base {
    Path(PathBuf),
    Inline(Mapping),
}

/// One variant: a name and the config keys it changes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    #[serde(default)]
    pub overrides: Mapping,
}

/// A variant ready to train: its merged, validated config.
#[derive(Debug)]
pub struct Variant {
    pub name: String,
    pub out_dir: PathBuf,
    /// The merged config as YAML, out_dir set.
    pub yaml: String,
    pub config: RunConfig,
}

/// A study file, read and checked: every variant's config is loaded as `mla train` would,
/// so a typo in the last variant fails before the first one trains.
#[derive(Debug)]
pub struct Study {
    pub name: String,
    pub out_dir: PathBuf,
    pub variants: Vec<Variant>,
}

/// Merge `over` into `base`: mappings key by key, recursively; anything else replaces.
pub fn deep_merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => deep_merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Study {
    /// Read `path`; `max_tokens` caps every variant's `train.max_tokens` (a shorter run of
    /// the same study: the schedule follows the shorter budget); `overrides` (litgpt-style
    /// `--key value`) apply to every variant after its own.
    pub fn load(
        path: &Path,
        max_tokens: Option<u64>,
        overrides: &[Override],
    ) -> anyhow::Result<Study> {
        let what = path.display().to_string();
        if let Some(o) = overrides.iter().find(|o| o.key == "out_dir") {
            return Err(BadInput(format!(
                "--out_dir {}: each variant trains into the study's out_dir/<name>; change out_dir in {what}",
                o.value
            ))
            .into());
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| BadInput(format!("{what}: cannot read the study file: {e}")))?;
        let de = serde_yaml_ng::Deserializer::from_str(&text);
        let file: StudyFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            BadInput(format!("{what}: {at}: {}", e.into_inner()))
        })?;
        if file.variants.is_empty() {
            return Err(BadInput(format!("{what}: variants: the study has no variants")).into());
        }
        if file.out_dir.contains("://") {
            return Err(BadInput(format!(
                "{what}: out_dir: {}: a study writes configs and the report locally; give a local directory",
                file.out_dir
            ))
            .into());
        }
        let out_dir = PathBuf::from(&file.out_dir);
        let base = match &file.base {
            Base::Inline(m) => m.clone(),
            Base::Path(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| BadInput(format!("{what}: base: {}: {e}", p.display())))?;
                serde_yaml_ng::from_str(&text).map_err(|e| {
                    BadInput(format!(
                        "{what}: base: {}: not a YAML mapping: {e}",
                        p.display()
                    ))
                })?
            }
        };
        let mut variants: Vec<Variant> = Vec::new();
        for (i, v) in file.variants.iter().enumerate() {
            let at = format!("{what}: variants[{i}]");
            if !valid_name(&v.name) {
                return Err(BadInput(format!(
                    "{at}: name {:?}: use letters, digits, '-', '_' or '.' (it names a directory)",
                    v.name
                ))
                .into());
            }
            if variants.iter().any(|w| w.name == v.name) {
                return Err(BadInput(format!("{at}: name {:?} is used twice", v.name)).into());
            }
            let mut merged = Value::Mapping(base.clone());
            deep_merge(&mut merged, &Value::Mapping(v.overrides.clone()));
            let dir = out_dir.join(&v.name);
            let Value::Mapping(m) = &mut merged else {
                unreachable!("a mapping merged with a mapping")
            };
            m.insert("out_dir".into(), dir.display().to_string().into());
            if let Some(cap) = max_tokens {
                let train = m
                    .entry("train".into())
                    .or_insert_with(|| Value::Mapping(Mapping::new()));
                if let Value::Mapping(t) = train {
                    let now = t.get("max_tokens").and_then(Value::as_u64);
                    let tokens = now.map_or(cap, |n| n.min(cap));
                    t.insert("max_tokens".into(), tokens.into());
                }
            }
            let yaml = serde_yaml_ng::to_string(&merged).context("serializing a variant")?;
            let config = RunConfig::from_yaml(&yaml, &format!("{at} ({})", v.name), overrides)?;
            variants.push(Variant {
                name: v.name.clone(),
                out_dir: dir,
                yaml,
                config,
            });
        }
        let name = file.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map_or("study".into(), |s| s.to_string_lossy().into_owned())
        });
        Ok(Study {
            name,
            out_dir,
            variants,
        })
    }
}

/// Whether `dir` holds a committed `final` checkpoint (the variant finished).
pub fn finished(dir: &Path) -> anyhow::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    let store = mla_storage::BlockingCheckpointStore::open(&dir.display().to_string())
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let steps = store
        .list()
        .map_err(|e| anyhow::anyhow!("{}: listing: {e}", dir.display()))?;
    Ok(steps
        .iter()
        .any(|s| s.exists() && s.step.to_string() == "final"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml_ng::from_str(s).expect("yaml")
    }

    #[test]
    fn deep_merge_merges_mappings_and_replaces_the_rest() {
        let mut base = yaml("a: {b: 1, c: {d: 2}}\nl: [1, 2]\nx: true");
        deep_merge(&mut base, &yaml("a: {c: {e: 3}}\nl: [3]\nx: {k: 1}"));
        assert_eq!(base, yaml("a: {b: 1, c: {d: 2, e: 3}}\nl: [3]\nx: {k: 1}"));
    }

    #[test]
    fn names_that_are_not_one_directory_are_refused() {
        for bad in ["", "..", "a/b", ".hidden", "a b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["mha", "mla-kv32", "gqa_4", "v1.2"] {
            assert!(valid_name(good), "{good:?}");
        }
    }
}
