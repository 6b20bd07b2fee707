//! Step names (`step-00000400`, `final`) and the `manifest.json` that commits a step.
//!
//! Pure data and validation: no I/O here (see `store.rs`). The schema is documented in
//! `storage/README.md`; bump [`FORMAT_VERSION`] on any incompatible change.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of the commit marker inside a step directory.
pub const MANIFEST_NAME: &str = "manifest.json";

/// Version of the manifest schema this crate writes; it reads this version and older.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the step directory of the end-of-training checkpoint.
pub const FINAL_DIR: &str = "final";

/// A step directory under `out_dir`: `step-00000400` (8-digit zero-padded optimizer step, more
/// digits past 99,999,999) or `final`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepName {
    Step(u64),
    Final,
}

impl StepName {
    /// The optimizer step in the directory name (`None` for `final`: read its manifest).
    pub fn number(&self) -> Option<u64> {
        match self {
            StepName::Step(n) => Some(*n),
            StepName::Final => None,
        }
    }

    /// Parse a directory name; `None` when it is not a step directory.
    pub fn parse(dir: &str) -> Option<StepName> {
        if dir == FINAL_DIR {
            return Some(StepName::Final);
        }
        let digits = dir.strip_prefix("step-")?;
        if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        // Exactly one spelling per step: `step-000000400` (9 digits) is not a step directory.
        (StepName::Step(n).to_string() == dir).then_some(StepName::Step(n))
    }
}

impl std::fmt::Display for StepName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepName::Step(n) => write!(f, "step-{n:08}"),
            StepName::Final => f.write_str(FINAL_DIR),
        }
    }
}

impl std::str::FromStr for StepName {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        StepName::parse(s).ok_or_else(|| crate::Error::NotAStepDir {
            location: s.to_string(),
        })
    }
}

impl Serialize for StepName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StepName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StepName::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not a step directory name: {s:?}")))
    }
}

/// One object of a step as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    /// Path relative to the step directory (`model.safetensors`, `tokenizer/tokenizer.json`).
    pub name: String,
    pub size_bytes: u64,
    /// Lower-case hex.
    pub sha256: String,
}

impl ObjectEntry {
    /// Describe `bytes` stored as `name`.
    pub fn of(name: &str, bytes: &[u8]) -> ObjectEntry {
        ObjectEntry {
            name: name.to_string(),
            size_bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        }
    }
}

/// What the caller says about a step; the store adds the object list, name and time.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ManifestMeta {
    /// Optimizer step the checkpoint was taken after.
    pub step: u64,
    pub tokens_seen: u64,
    pub world_size: u32,
    /// Digest of the shape-defining config; resume compares it (opaque string to this crate).
    pub config_digest: String,
    /// Free-form JSON the trainer wants next to the checkpoint (`null` when absent).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

/// `manifest.json`: written last; its presence and validity is what makes a step exist.
///
/// Unknown fields are ignored so additive changes need no version bump; incompatible ones do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// The directory this manifest commits (guards against a manifest copied to another dir).
    pub name: StepName,
    pub step: u64,
    pub tokens_seen: u64,
    pub world_size: u32,
    pub config_digest: String,
    /// RFC 3339 UTC time of the commit.
    pub created: String,
    pub objects: Vec<ObjectEntry>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

impl Manifest {
    pub fn new(name: StepName, meta: ManifestMeta, objects: Vec<ObjectEntry>) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            name,
            step: meta.step,
            tokens_seen: meta.tokens_seen,
            world_size: meta.world_size,
            config_digest: meta.config_digest,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            objects,
            extra: meta.extra,
        }
    }

    /// Sum of the object sizes.
    pub fn total_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size_bytes).sum()
    }

    pub fn object(&self, name: &str) -> Option<&ObjectEntry> {
        self.objects.iter().find(|o| o.name == name)
    }

    /// Parse and check a manifest read from directory `dir`. `Err` is a human reason.
    pub fn from_json(bytes: &[u8], dir: &StepName) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        m.check(dir)?;
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, integers and a serde_json::Value cannot fail to serialize.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Invariants every valid manifest satisfies.
    pub fn check(&self, dir: &StepName) -> Result<(), String> {
        if self.format_version == 0 || self.format_version > FORMAT_VERSION {
            return Err(format!(
                "format_version {} not supported (this build reads 1..={FORMAT_VERSION})",
                self.format_version
            ));
        }
        if &self.name != dir {
            return Err(format!("manifest is for {}, found in {dir}", self.name));
        }
        if let StepName::Step(n) = dir {
            if *n != self.step {
                return Err(format!("step {} does not match directory {dir}", self.step));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for o in &self.objects {
            check_object_name(&o.name).map_err(|e| e.to_string())?;
            if !seen.insert(o.name.as_str()) {
                return Err(format!("object {} listed twice", o.name));
            }
            if o.sha256.len() != 64 || !o.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("object {}: sha256 is not 64 hex digits", o.name));
            }
        }
        Ok(())
    }
}

/// Object names are relative paths of plain segments (`[A-Za-z0-9._-]`, not `.`/`..`), and
/// `manifest.json` is reserved. Keeps names portable across local disks and S3.
pub fn check_object_name(name: &str) -> crate::Result<()> {
    let bad = |reason: &str| {
        Err(crate::Error::InvalidObjectName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name == MANIFEST_NAME {
        return bad("reserved for the commit marker");
    }
    for seg in name.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("empty, '.' or '..' path segment");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad("only [A-Za-z0-9._-] and '/' are allowed");
        }
    }
    Ok(())
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_round_trip_and_reject_other_spellings() {
        assert_eq!(StepName::Step(400).to_string(), "step-00000400");
        assert_eq!(StepName::parse("step-00000400"), Some(StepName::Step(400)));
        assert_eq!(StepName::parse("final"), Some(StepName::Final));
        assert_eq!(
            StepName::parse("step-123456789"),
            Some(StepName::Step(123_456_789))
        );
        for bad in [
            "step-400",
            "step-000000400",
            "step-0000040a",
            "steps",
            "Final",
            "",
        ] {
            assert_eq!(StepName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn manifest_check_rejects_mismatched_dir_and_duplicates() {
        let meta = ManifestMeta {
            step: 400,
            ..Default::default()
        };
        let e = ObjectEntry::of("a.bin", b"x");
        let m = Manifest::new(StepName::Step(400), meta.clone(), vec![e.clone()]);
        assert!(m.check(&StepName::Step(400)).is_ok());
        assert!(m.check(&StepName::Step(500)).is_err());
        let dup = Manifest::new(StepName::Step(400), meta, vec![e.clone(), e]);
        assert!(dup
            .check(&StepName::Step(400))
            .unwrap_err()
            .contains("twice"));
        let json = m.to_json();
        assert_eq!(Manifest::from_json(&json, &StepName::Step(400)).unwrap(), m);
        assert!(Manifest::from_json(b"{", &StepName::Step(400)).is_err());
    }

    #[test]
    fn object_names_are_plain_relative_paths() {
        for ok in [
            "model.safetensors",
            "tokenizer/tokenizer.json",
            "rank-0_of-8.bin",
        ] {
            assert!(check_object_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "manifest.json",
            "../x",
            "a//b",
            "/abs",
            "a b",
            "a/./b",
            "é",
        ] {
            assert!(check_object_name(bad).is_err(), "{bad}");
        }
    }
}
