//! Training metrics: a human line per log interval on stderr (rank 0), one JSON object per
//! line in `<out_dir>/metrics.jsonl` (always), `metrics.csv` when `logger_name: csv`, and
//! TensorBoard event files under `<out_dir>/tensorboard/` when `logger_name: tensorboard`.
//!
//! JSONL keys: train lines `step, tokens, loss, lr, grad_norm, tokens_per_sec, mfu,
//! peak_memory_bytes, elapsed_secs`; eval lines `step, tokens, val_loss, val_ppl`.
//! Not here: what is measured (train.rs decides) or where out_dir lives for checkpoints.

use crate::config::LoggerName;
use crate::tensorboard::EventWriter;
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One training log record.
#[derive(Debug, Clone, Serialize)]
pub struct TrainRecord {
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    pub mfu: Option<f64>,
    pub peak_memory_bytes: Option<u64>,
    pub elapsed_secs: f64,
    pub skipped_steps: u64,
    /// Share of the logging window's wall time the host spent waiting for the data loader
    /// (reads from disk or object storage); near 0 unless the run is data-bound.
    pub data_wait_frac: f64,
}

/// Data wait shown in the human line from this share on.
const SHOW_DATA_WAIT: f64 = 0.01;

/// One validation record.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRecord {
    pub step: u64,
    pub tokens: u64,
    pub val_loss: f64,
    pub val_ppl: f64,
    pub eval_secs: f64,
}

const CSV_HEADER: &str =
    "step,tokens,loss,lr,grad_norm,tokens_per_sec,mfu,peak_memory_bytes,val_loss,val_ppl\n";

/// Where metrics go. Files are opened in append mode so a resumed run continues them.
pub struct MetricsWriter {
    jsonl: BufWriter<File>,
    csv: Option<BufWriter<File>>,
    tensorboard: Option<EventWriter>,
    dir: PathBuf,
}

/// Open `dir/name` for appending, never through a link planted there (an out_dir is
/// untrusted: `metrics.jsonl -> ~/.bashrc` must not be appended to). Returns whether it
/// already held something.
fn open_append(dir: &Path, name: &str) -> std::io::Result<(File, bool)> {
    let f = mla_storage::open_file(dir, name, mla_storage::OpenMode::Append)?;
    let existed = f.metadata()?.len() > 0;
    Ok((f, existed))
}

impl MetricsWriter {
    /// Metrics files under the local directory `dir`.
    pub fn create(dir: &Path, logger: LoggerName) -> std::io::Result<MetricsWriter> {
        std::fs::create_dir_all(dir)?;
        let (jsonl, _) = open_append(dir, "metrics.jsonl")?;
        let csv = match logger {
            LoggerName::Csv => {
                let (f, existed) = open_append(dir, "metrics.csv")?;
                let mut w = BufWriter::new(f);
                if !existed {
                    w.write_all(CSV_HEADER.as_bytes())?;
                }
                Some(w)
            }
            _ => None,
        };
        let tensorboard = match logger {
            LoggerName::Tensorboard => Some(EventWriter::create(&mla_storage::create_dir(
                dir,
                "tensorboard",
            )?)?),
            _ => None,
        };
        Ok(MetricsWriter {
            jsonl: BufWriter::new(jsonl),
            csv,
            tensorboard,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn json_line(&mut self, value: &impl Serialize) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.jsonl, value)?;
        self.jsonl.write_all(b"\n")?;
        self.jsonl.flush()
    }

    pub fn train(&mut self, r: &TrainRecord) -> std::io::Result<()> {
        self.json_line(r)?;
        if let Some(csv) = &mut self.csv {
            let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
            writeln!(
                csv,
                "{},{},{},{},{},{},{},{},,",
                r.step,
                r.tokens,
                r.loss,
                r.lr,
                r.grad_norm,
                r.tokens_per_sec,
                opt(r.mfu),
                r.peak_memory_bytes
                    .map(|b| b.to_string())
                    .unwrap_or_default()
            )?;
            csv.flush()?;
        }
        if let Some(tb) = &mut self.tensorboard {
            let mut values = vec![
                ("train/loss", r.loss),
                ("train/lr", r.lr),
                ("train/grad_norm", r.grad_norm),
                ("train/tokens_per_sec", r.tokens_per_sec),
                ("train/tokens", r.tokens as f64),
                ("train/data_wait_frac", r.data_wait_frac),
            ];
            if let Some(m) = r.mfu {
                values.push(("train/mfu", m));
            }
            tb.scalars(r.step, &values)?;
        }
        Ok(())
    }

    pub fn eval(&mut self, r: &EvalRecord) -> std::io::Result<()> {
        self.json_line(r)?;
        if let Some(csv) = &mut self.csv {
            writeln!(
                csv,
                "{},{},,,,,,,{},{}",
                r.step, r.tokens, r.val_loss, r.val_ppl
            )?;
            csv.flush()?;
        }
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(r.step, &[("val/loss", r.val_loss), ("val/ppl", r.val_ppl)])?;
        }
        Ok(())
    }
}

/// An integer with thousands separators: 13,671,168.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes as "1.23 GiB".
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[i])
    }
}

/// The human line of a training record.
pub fn train_line(r: &TrainRecord, total_steps: Option<u64>) -> String {
    let step = match total_steps {
        Some(n) => format!("step {}/{n}", r.step),
        None => format!("step {}", r.step),
    };
    let mfu = r
        .mfu
        .map(|m| format!(" | MFU {:.1}%", m * 100.0))
        .unwrap_or_default();
    let mem = r
        .peak_memory_bytes
        .map(|b| format!(" | peak mem {}", human_bytes(b)))
        .unwrap_or_default();
    let data = if r.data_wait_frac >= SHOW_DATA_WAIT {
        format!(" | data wait {:.0}%", r.data_wait_frac * 100.0)
    } else {
        String::new()
    };
    // Time left at the window's speed: the steps to go × the tokens of one step ÷ tokens/s.
    let eta = match total_steps {
        Some(n) if n > r.step && r.step > 0 && r.tokens_per_sec > 0.0 => {
            let secs_per_step = r.tokens as f64 / r.step as f64 / r.tokens_per_sec;
            format!(
                " | ETA {}",
                short_duration((n - r.step) as f64 * secs_per_step)
            )
        }
        _ => String::new(),
    };
    format!(
        "{step} | loss {:.4} | lr {:.3e} | grad norm {:.3} | {:.0} tok/s{eta}{mfu}{mem}{data}",
        r.loss, r.lr, r.grad_norm, r.tokens_per_sec
    )
}

/// A duration for a log line: "45s", "3m07s", "1h02m", "2d03h".
pub fn short_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, tokens_per_sec: f64) -> TrainRecord {
        TrainRecord {
            step,
            tokens: step * 1000,
            loss: 2.0,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens_per_sec,
            mfu: None,
            peak_memory_bytes: None,
            elapsed_secs: 1.0,
            skipped_steps: 0,
            data_wait_frac: 0.0,
        }
    }

    /// 1000 tokens a step at 100 tok/s is 10 s a step: 30 steps to go are 5 minutes. No total,
    /// the last step or no speed yet: no ETA.
    #[test]
    fn the_line_says_the_time_left_at_the_windows_speed() {
        let line = train_line(&record(10, 100.0), Some(40));
        assert!(
            line.contains("step 10/40") && line.contains("| ETA 5m00s"),
            "{line}"
        );
        assert!(!train_line(&record(10, 100.0), None).contains("ETA"));
        assert!(!train_line(&record(40, 100.0), Some(40)).contains("ETA"));
        assert!(!train_line(&record(10, 0.0), Some(40)).contains("ETA"));
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(44.6), "45s");
        assert_eq!(short_duration(187.0), "3m07s");
        assert_eq!(short_duration(3720.0), "1h02m");
        assert_eq!(short_duration(183_600.0), "2d03h");
        assert_eq!(short_duration(-1.0), "0s");
    }
}
