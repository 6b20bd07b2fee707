//! TensorBoard event files (`logger_name: tensorboard`): scalars written as TFRecord-framed
//! `Event` protobufs that TensorBoard's `EventAccumulator` reads. The messages are the few
//! fields of tensorflow's event.proto/summary.proto that scalars need, encoded with `prost`;
//! records are framed with masked CRC32C as TFRecord requires.
//!
//! Not here: which scalars to log (train.rs / metrics.rs).

use prost::Message;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, tag = "2")]
    simple_value: f32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One events file under a log directory.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// Create `<dir>/events.out.tfevents.<time>.<host>.<pid>` (a new file per run, as TensorBoard
    /// expects; it merges the files of a directory).
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let name = format!(
            "events.out.tfevents.{}.{host}.{}",
            now() as u64,
            std::process::id()
        );
        // A new file, never an entry planted under that name (a link to elsewhere).
        let file = mla_storage::open_file(dir, &name, mla_storage::OpenMode::CreateNew)?;
        let mut w = EventWriter {
            out: BufWriter::new(file),
            path: dir.join(name),
        };
        w.write_event(&Event {
            wall_time: now(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_event(&mut self, event: &Event) -> std::io::Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(&data)?;
        self.out.write_all(&masked_crc(&data).to_le_bytes())?;
        self.out.flush()
    }

    /// Scalars `(tag, value)` at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let summary = Summary {
            value: values
                .iter()
                .map(|(tag, v)| SummaryValue {
                    tag: (*tag).to_string(),
                    simple_value: *v as f32,
                })
                .collect(),
        };
        self.write_event(&Event {
            wall_time: now(),
            step: step as i64,
            what: Some(What::Summary(summary)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // tensorflow/core/lib/hash/crc32c.h Mask(): rotate right 15, add 0xa282ead8.
        // crc32c("") = 0 → masked 0xa282ead8; crc32c("123456789") = 0xe3069283.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        assert_eq!(
            crc32c::crc32c(b"123456789"),
            0xe306_9283,
            "Castagnoli, not IEEE CRC-32"
        );
    }

    #[test]
    fn records_are_length_prefixed_and_decode_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(7, &[("train/loss", 2.5)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut off = 0;
        let mut events = Vec::new();
        while off < bytes.len() {
            let len = u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap()) as usize;
            let data = &bytes[off + 12..off + 12 + len];
            let crc = u32::from_le_bytes(bytes[off + 12 + len..off + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            events.push(Event::decode(data).unwrap());
            off += 16 + len;
        }
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].step, 7);
        let Some(What::Summary(s)) = &events[1].what else {
            panic!("summary")
        };
        assert_eq!(
            (s.value[0].tag.as_str(), s.value[0].simple_value),
            ("train/loss", 2.5)
        );
    }
}
