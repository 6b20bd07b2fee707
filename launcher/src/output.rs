//! Rank output: copy each rank's stdout/stderr to the launcher's, line by line, prefixed
//! `[rank K] `; for mpirun, turn its `--tag-output` tags (`[job,rank]<stdout>:`) into the same
//! prefixes and pick out its report of which rank failed. Not here: processes and signals.

use crate::status::RankExit;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    Stderr,
}

/// Write one line (with its newline) to the launcher's stdout or stderr in one call, so lines
/// of different ranks never interleave. Write errors (a closed pipe) are ignored: the ranks must
/// keep running and their pipes keep draining.
pub fn emit(sink: Sink, prefix: &[u8], line: &[u8]) {
    let mut buf = Vec::with_capacity(prefix.len() + line.len() + 1);
    buf.extend_from_slice(prefix);
    buf.extend_from_slice(line);
    if !buf.ends_with(b"\n") {
        buf.push(b'\n');
    }
    let _ = match sink {
        Sink::Stdout => std::io::stdout().lock().write_all(&buf),
        Sink::Stderr => std::io::stderr().lock().write_all(&buf),
    };
}

pub fn rank_prefix(rank: u32, prefix_rank0: bool) -> Vec<u8> {
    if rank == 0 && !prefix_rank0 {
        Vec::new()
    } else {
        format!("[rank {rank}] ").into_bytes()
    }
}

/// Copy `r` to `sink` line by line with `prefix`, until EOF.
pub fn pump(r: impl Read + Send + 'static, sink: Sink, prefix: Vec<u8>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => emit(sink, &prefix, &line),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    })
}

/// What mpirun said about the first failing rank, if anything.
pub type Blame = Arc<Mutex<Option<(u32, RankExit)>>>;

/// Copy mpirun's output: tagged rank lines get `[rank K] ` (rank 0 bare unless `prefix_rank0`)
/// and go to the stream they were written to; mpirun's own lines go to stderr as `[mpirun] `.
/// The first failure report — the rank shim's line, else mpirun's banner — goes into `blame`.
pub fn pump_mpirun(
    r: impl Read + Send + 'static,
    prefix_rank0: bool,
    blame: Blame,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        let mut demux = Demux::default();
        let mut report = MpirunReport::default();
        let mut handle = |piece: Piece| match piece {
            Piece::Rank(rank, sink, text) => {
                match crate::shim::parse_report(&String::from_utf8_lossy(&text)) {
                    Some(exit) => {
                        blame
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert((rank, exit));
                    }
                    None => emit(sink, &rank_prefix(rank, prefix_rank0), &text),
                }
            }
            Piece::Mpirun(text) => {
                if let Some(b) = report.feed(&String::from_utf8_lossy(&text)) {
                    blame
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(b);
                }
                emit(Sink::Stderr, b"[mpirun] ", &text);
            }
        };
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => demux.feed(&line).into_iter().for_each(&mut handle),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        demux.finish().into_iter().for_each(&mut handle);
    })
}

/// A piece of mpirun's output: a whole line of one rank, or a line of mpirun's own.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Rank(u32, Sink, Vec<u8>),
    Mpirun(Vec<u8>),
}

/// Reassembles rank lines from mpirun's `--tag-output` stream. mpirun tags every *chunk* a rank
/// writes, so a line written in two writes arrives as `[1,0]<stdout>:a[1,0]<stdout>:b\n`, and
/// another rank's chunk may sit between the halves; partial lines wait per (rank, stream).
#[derive(Debug, Default)]
pub struct Demux {
    partial: Vec<((u32, Sink), Vec<u8>)>,
}

impl Demux {
    pub fn feed(&mut self, line: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        let tags: Vec<(usize, usize, u32, Sink)> = (0..line.len())
            .filter(|&i| line[i] == b'[')
            .filter_map(|i| tag_at(&line[i..]).map(|(len, rank, sink)| (i, i + len, rank, sink)))
            .collect();
        let first = tags.first().map_or(line.len(), |t| t.0);
        if first > 0 {
            out.push(Piece::Mpirun(line[..first].to_vec()));
        }
        for (k, &(_, text_start, rank, sink)) in tags.iter().enumerate() {
            let text_end = tags.get(k + 1).map_or(line.len(), |t| t.0);
            let buf = self.buffer(rank, sink);
            buf.extend_from_slice(&line[text_start..text_end]);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let rest = buf.split_off(nl + 1);
                let whole = std::mem::replace(buf, rest);
                out.push(Piece::Rank(rank, sink, whole));
            }
        }
        out
    }

    /// Lines still incomplete at EOF.
    pub fn finish(&mut self) -> Vec<Piece> {
        self.partial
            .drain(..)
            .filter(|(_, b)| !b.is_empty())
            .map(|((rank, sink), b)| Piece::Rank(rank, sink, b))
            .collect()
    }

    fn buffer(&mut self, rank: u32, sink: Sink) -> &mut Vec<u8> {
        let i = match self.partial.iter().position(|(k, _)| *k == (rank, sink)) {
            Some(i) => i,
            None => {
                self.partial.push(((rank, sink), Vec::new()));
                self.partial.len() - 1
            }
        };
        &mut self.partial[i].1
    }
}

/// `[1,3]<stdout>:text` → (3, Stdout, "text"). OpenMPI 4.x format.
pub fn parse_tag(line: &[u8]) -> Option<(u32, Sink, &[u8])> {
    let (len, rank, sink) = tag_at(line)?;
    Some((rank, sink, &line[len..]))
}

/// A tag `[job,rank]<stream>:` at the start of `s`: its length, the rank, the stream.
fn tag_at(s: &[u8]) -> Option<(usize, u32, Sink)> {
    let rest = s.strip_prefix(b"[")?;
    let close = rest.iter().take(24).position(|&b| b == b']')?;
    let inside = std::str::from_utf8(&rest[..close]).ok()?;
    let (job, rank) = inside.split_once(',')?;
    if job.is_empty() || !job.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rank = rank.parse().ok()?;
    let after = &rest[close + 1..];
    let (sink, tag_len) = [
        (&b"<stdout>:"[..], Sink::Stdout),
        (&b"<stderr>:"[..], Sink::Stderr),
        (&b"<stddiag>:"[..], Sink::Stderr),
    ]
    .into_iter()
    .find(|(t, _)| after.starts_with(t))
    .map(|(t, sink)| (sink, t.len()))?;
    Some((1 + close + 1 + tag_len, rank, sink))
}

/// Reads mpirun's (OpenMPI 4.x) failure banners:
/// `mpirun noticed that process rank 1 with PID 0 on node x exited on signal 9 (Killed).` and
/// `Process name: [[4973,1],1]` followed by `Exit code:    3`.
#[derive(Debug, Default)]
pub struct MpirunReport {
    process_rank: Option<u32>,
}

impl MpirunReport {
    pub fn feed(&mut self, line: &str) -> Option<(u32, RankExit)> {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("mpirun noticed that process rank ") {
            let rank = rest.split_whitespace().next()?.parse().ok()?;
            let sig = rest
                .split_once("exited on signal ")?
                .1
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            return Some((rank, RankExit::Signal(sig)));
        }
        if let Some(name) = line.strip_prefix("Process name:") {
            // [[job,1],rank]
            let inner = name.trim().trim_end_matches(']');
            self.process_rank = inner.rsplit(',').next().and_then(|r| r.trim().parse().ok());
            return None;
        }
        if let Some(code) = line.strip_prefix("Exit code:") {
            let rank = self.process_rank.take()?;
            return Some((rank, RankExit::Code(code.trim().parse().ok()?)));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_become_rank_and_stream() {
        assert_eq!(
            parse_tag(b"[1,3]<stdout>:hello [x]\n"),
            Some((3, Sink::Stdout, &b"hello [x]\n"[..]))
        );
        assert_eq!(
            parse_tag(b"[1,0]<stderr>:e"),
            Some((0, Sink::Stderr, &b"e"[..]))
        );
        assert_eq!(parse_tag(b"[warn] something"), None);
        assert_eq!(parse_tag(b"-----------\n"), None);
    }

    #[test]
    fn demux_reassembles_lines_split_into_chunks() {
        let mut d = Demux::default();
        let mut got = d.feed(b"[1,0]<stdout>:a\n");
        got.extend(d.feed(b"[1,0]<stdout>:par[1,1]<stderr>:x\n"));
        got.extend(d.feed(b"[1,0]<stdout>:tial\n"));
        got.extend(d.feed(b"-----\n"));
        got.extend(d.feed(b"[1,1]<stdout>:no newline"));
        got.extend(d.finish());
        assert_eq!(
            got,
            [
                Piece::Rank(0, Sink::Stdout, b"a\n".to_vec()),
                Piece::Rank(1, Sink::Stderr, b"x\n".to_vec()),
                Piece::Rank(0, Sink::Stdout, b"partial\n".to_vec()),
                Piece::Mpirun(b"-----\n".to_vec()),
                Piece::Rank(1, Sink::Stdout, b"no newline".to_vec()),
            ]
        );
    }

    #[test]
    fn mpirun_signal_report_names_the_rank() {
        let mut r = MpirunReport::default();
        assert_eq!(
            r.feed("mpirun noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed).\n"),
            Some((1, RankExit::Signal(9)))
        );
    }

    #[test]
    fn mpirun_exit_code_report_names_the_rank() {
        let mut r = MpirunReport::default();
        let banner = "mpirun detected that one or more processes exited with non-zero status, thus causing\n\
                      the job to be terminated. The first process to do so was:\n\n  \
                      Process name: [[4973,1],1]\n  Exit code:    3\n";
        let got: Vec<_> = banner.lines().filter_map(|l| r.feed(l)).collect();
        assert_eq!(got, [(1, RankExit::Code(3))]);
    }

    #[test]
    fn rank0_is_bare_unless_asked() {
        assert_eq!(rank_prefix(0, false), b"");
        assert_eq!(rank_prefix(0, true), b"[rank 0] ");
        assert_eq!(rank_prefix(5, false), b"[rank 5] ");
    }
}
