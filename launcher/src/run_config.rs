//! What the run config says about how many ranks to start: litgpt's top-level `devices`
//! (per node: GPUs, or CPU processes) and `num_nodes`, with their command-line overrides among
//! the arguments passed through to the ranks (`--devices 2`, `--num_nodes=2`). They are the
//! defaults of `--gpus`/`--nproc` and `--nnodes`; a flag wins. Nothing else of the config is
//! read here: the trainer owns it (and checks these two against the ranks it finds).

use crate::BadInput;
use serde_yaml_ng::Value;
use std::ffi::OsString;
use std::path::Path;

/// `devices` and `num_nodes` of a run config; None where absent (or `devices: auto`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RankHints {
    pub devices: Option<u32>,
    pub num_nodes: Option<u32>,
}

/// The hints of the config at `path` (a missing or unreadable file gives none: the plan
/// reports it), overridden by `--devices`/`--num_nodes` in `passthrough`.
pub fn read(path: &Path, passthrough: &[OsString]) -> Result<RankHints, BadInput> {
    let what = path.display();
    let root = match std::fs::read_to_string(path) {
        Ok(text) => serde_yaml_ng::from_str::<Value>(&text).unwrap_or(Value::Null),
        Err(_) => return Ok(RankHints::default()),
    };
    let from_file = |key: &str| root.get(key).cloned();
    let from_flag = |key: &str| override_of(passthrough, key).map(Value::String);
    let count = |key: &str, auto_ok: bool| -> Result<Option<u32>, BadInput> {
        let (value, source) = match from_flag(key) {
            Some(v) => (v, format!("--{key}")),
            None => match from_file(key) {
                Some(v) => (v, format!("{what}: {key}")),
                None => return Ok(None),
            },
        };
        let text = match &value {
            Value::Null => return Ok(None),
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.trim().to_string(),
            other => format!("{other:?}"),
        };
        if auto_ok && text == "auto" {
            return Ok(None);
        }
        match text.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(BadInput(format!(
                "{source}: {text} is not a positive number{}",
                if auto_ok { " or \"auto\"" } else { "" }
            ))),
        }
    };
    Ok(RankHints {
        devices: count("devices", true)?,
        num_nodes: count("num_nodes", false)?,
    })
}

/// The value of `--key V` or `--key=V` in `args` (the last one wins, as in the trainer).
fn override_of(args: &[OsString], key: &str) -> Option<String> {
    let flag = format!("--{key}");
    let mut found = None;
    let mut it = args.iter().filter_map(|a| a.to_str());
    while let Some(a) = it.next() {
        if a == flag {
            found = it.next().map(str::to_string);
        } else if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            found = Some(v.to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hints(yaml: &str, args: &[&str]) -> Result<RankHints, BadInput> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg.yaml");
        std::fs::write(&path, yaml).unwrap();
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        read(&path, &args)
    }

    #[test]
    fn devices_and_num_nodes_come_from_the_file_or_its_overrides() {
        let h = hints("devices: 4\nnum_nodes: 2\n", &[]).unwrap();
        assert_eq!((h.devices, h.num_nodes), (Some(4), Some(2)));
        let h = hints("devices: auto\n", &[]).unwrap();
        assert_eq!((h.devices, h.num_nodes), (None, None));
        let h = hints("devices: 4\n", &["--devices", "2", "--num_nodes=3"]).unwrap();
        assert_eq!((h.devices, h.num_nodes), (Some(2), Some(3)));
        let e = hints("devices: 0\n", &[]).unwrap_err().0;
        assert!(
            e.ends_with("cfg.yaml: devices: 0 is not a positive number or \"auto\""),
            "{e}"
        );
        let e = hints("", &["--num_nodes", "two"]).unwrap_err().0;
        assert_eq!(e, "--num_nodes: two is not a positive number");
    }
}
