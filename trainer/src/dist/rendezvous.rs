//! A one-shot TCP rendezvous: rank 0 hands a small payload (the NCCL unique id) to every other
//! rank at MASTER_ADDR:MASTER_PORT, for ranks started torchrun-style (mla-launch --gpus N,
//! several nodes) where there is no MPI to broadcast it.
//!
//! Protocol, one connection per rank: the client sends `mla-rendezvous 1 rank R world W\n`;
//! rank 0 answers `ok N\n` and N payload bytes, or `error <why>\n` (another world size, a rank
//! out of range or seen twice). Clients retry connecting until the deadline (rank 0 may start
//! later); rank 0 waits until all W−1 ranks were served or the deadline passes, and says
//! which ranks never came. Not here: what the payload means (nccl.rs).

use super::DistError;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &str = "mla-rendezvous 1";
/// Largest payload accepted (an NCCL unique id is 128 bytes).
const MAX_PAYLOAD: usize = 1 << 16;

fn setup(msg: String) -> DistError {
    DistError::Setup(msg)
}

fn resolve(addr: &str, port: u16) -> Result<Vec<SocketAddr>, DistError> {
    let found: Vec<SocketAddr> = (addr, port)
        .to_socket_addrs()
        .map_err(|e| {
            setup(format!(
                "rendezvous: cannot resolve MASTER_ADDR {addr}: {e}"
            ))
        })?
        .collect();
    if found.is_empty() {
        return Err(setup(format!(
            "rendezvous: MASTER_ADDR {addr} resolves to no address"
        )));
    }
    Ok(found)
}

/// Rank 0's socket: every interface at MASTER_PORT, as torch's TCPStore listens. Binding
/// MASTER_ADDR itself fails on the common Debian/Ubuntu /etc/hosts that maps the node's own
/// hostname to 127.0.1.1: rank 0 would listen on loopback and remote ranks would wait out the
/// timeout. MASTER_ADDR must still resolve (the other ranks connect to it); IPv4 unless it has
/// only IPv6 addresses.
pub fn listen(addr: &str, port: u16) -> Result<TcpListener, DistError> {
    let addrs = resolve(addr, port)?;
    let any: SocketAddr = if addrs.iter().any(SocketAddr::is_ipv4) {
        (Ipv4Addr::UNSPECIFIED, port).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, port).into()
    };
    TcpListener::bind(any).map_err(|e| {
        setup(format!(
            "rendezvous: rank 0 cannot listen on port {port} of every interface (MASTER_ADDR {addr}): {e} (MASTER_PORT in use?)"
        ))
    })
}

/// Rank 0: give `payload` to ranks 1…world_size−1, each once, within `timeout`.
pub fn serve(
    listener: &TcpListener,
    world_size: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), DistError> {
    let deadline = Instant::now() + timeout;
    let here = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    listener
        .set_nonblocking(true)
        .map_err(|e| setup(format!("rendezvous at {here}: {e}")))?;
    let mut served = vec![false; world_size];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Some(r) = answer(stream, world_size, &served, payload, deadline)
                    .map_err(|e| setup(format!("rendezvous at {here}: {peer}: {e}")))?
                {
                    served[r] = true;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (0..world_size)
                        .filter(|&r| !served[r])
                        .map(|r| r.to_string())
                        .collect();
                    return Err(setup(format!(
                        "rendezvous at {here}: rank(s) {} did not arrive within {} s",
                        missing.join(", "),
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(setup(format!("rendezvous at {here}: accept: {e}"))),
        }
    }
    Ok(())
}

/// Answer one client; `Ok(Some(rank))` when it got the payload, `Ok(None)` for a connection
/// that is not a rendezvous client (ignored), `Err` for a client of another job shape.
fn answer(
    stream: TcpStream,
    world_size: usize,
    served: &[bool],
    payload: &[u8],
    deadline: Instant,
) -> Result<Option<usize>, String> {
    // Bounded, so a silent connection cannot hold up the ranks behind it for long.
    let left = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_secs(1), Duration::from_secs(10));
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(left));
    let _ = stream.set_write_timeout(Some(left));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.by_ref().take(256).read_line(&mut line).is_err() {
        return Ok(None);
    }
    let Some(rest) = line.trim_end().strip_prefix(MAGIC) else {
        return Ok(None);
    };
    let words: Vec<&str> = rest.split_whitespace().collect();
    let parsed = match words.as_slice() {
        ["rank", r, "world", w] => r.parse::<usize>().ok().zip(w.parse::<usize>().ok()),
        _ => None,
    };
    let mut w = &stream;
    let refuse = |mut w: &TcpStream, why: String| {
        let _ = writeln!(w, "error {why}");
        Err(why)
    };
    let Some((rank, world)) = parsed else {
        return refuse(w, format!("malformed request {:?}", line.trim_end()));
    };
    if world != world_size {
        return refuse(
            w,
            format!("rank {rank} has world size {world}, rank 0 has {world_size}"),
        );
    }
    if rank == 0 || rank >= world_size || served[rank] {
        return refuse(w, format!("rank {rank} is out of range or came twice"));
    }
    let sent = writeln!(w, "ok {}", payload.len()).and_then(|_| w.write_all(payload));
    Ok(sent.ok().map(|_| rank))
}

/// Ranks ≥ 1: fetch rank 0's payload from `addr:port`, retrying until `timeout`.
pub fn fetch(
    addr: &str,
    port: u16,
    rank: usize,
    world_size: usize,
    timeout: Duration,
) -> Result<Vec<u8>, DistError> {
    let deadline = Instant::now() + timeout;
    let addrs = resolve(addr, port)?;
    let mut last_error = String::from("no attempt");
    loop {
        for a in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(setup(format!(
                    "rendezvous: rank {rank} got nothing from rank 0 at {addr}:{port} within {} s ({last_error}); is rank 0 running, and MASTER_ADDR reachable from here?",
                    timeout.as_secs()
                )));
            }
            match TcpStream::connect_timeout(a, left.min(Duration::from_secs(5))) {
                Ok(s) => match request(s, rank, world_size, left) {
                    Ok(Ok(payload)) => return Ok(payload),
                    Ok(Err(refused)) => {
                        return Err(setup(format!(
                            "rendezvous at {addr}:{port}: rank 0 refused rank {rank}: {refused}"
                        )))
                    }
                    Err(e) => last_error = e.to_string(),
                },
                Err(e) => last_error = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request; the outer error is the connection's (retry), the inner one rank 0's refusal.
fn request(
    stream: TcpStream,
    rank: usize,
    world_size: usize,
    left: Duration,
) -> std::io::Result<Result<Vec<u8>, String>> {
    stream.set_read_timeout(Some(left.max(Duration::from_millis(100))))?;
    writeln!(&stream, "{MAGIC} rank {rank} world {world_size}")?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.by_ref().take(512).read_line(&mut line)?;
    let line = line.trim_end();
    if let Some(why) = line.strip_prefix("error ") {
        return Ok(Err(why.to_string()));
    }
    let len = line
        .strip_prefix("ok ")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n <= MAX_PAYLOAD)
        .ok_or_else(|| {
            std::io::Error::new(
                ErrorKind::InvalidData,
                format!("unexpected answer {line:?} (is MASTER_PORT another service?)"),
            )
        })?;
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    Ok(Ok(payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn local() -> (TcpListener, u16) {
        let l = listen("127.0.0.1", 0).unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    #[test]
    fn rank0_hands_the_payload_to_every_other_rank() {
        let (l, port) = local();
        let payload: Vec<u8> = (0..128u8).collect();
        let clients: Vec<_> = (1..4)
            .map(|r| thread::spawn(move || fetch("127.0.0.1", port, r, 4, Duration::from_secs(10))))
            .collect();
        serve(&l, 4, &payload, Duration::from_secs(10)).unwrap();
        for c in clients {
            assert_eq!(c.join().unwrap().unwrap(), payload);
        }
    }

    #[test]
    fn a_rank_that_starts_before_rank0_retries_until_it_listens() {
        let port = {
            let (l, port) = local();
            drop(l);
            port
        };
        let client = thread::spawn(move || fetch("localhost", port, 1, 2, Duration::from_secs(10)));
        thread::sleep(Duration::from_millis(300));
        let l = listen("127.0.0.1", port).unwrap();
        serve(&l, 2, b"id", Duration::from_secs(10)).unwrap();
        assert_eq!(client.join().unwrap().unwrap(), b"id");
    }

    #[test]
    fn no_rank0_is_a_timeout_naming_the_address() {
        let port = {
            let (l, port) = local();
            drop(l);
            port
        };
        let e = fetch("127.0.0.1", port, 1, 2, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(e.contains("rank 1 got nothing from rank 0"), "{e}");
    }

    #[test]
    fn rank0_names_the_ranks_that_never_came() {
        let (l, port) = local();
        let client = thread::spawn(move || fetch("127.0.0.1", port, 2, 3, Duration::from_secs(10)));
        let e = serve(&l, 3, b"id", Duration::from_millis(500))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank(s) 1 did not arrive"), "{e}");
        assert_eq!(client.join().unwrap().unwrap(), b"id");
    }

    #[test]
    fn another_world_size_is_refused_on_both_sides() {
        let (l, port) = local();
        let client = thread::spawn(move || fetch("127.0.0.1", port, 1, 3, Duration::from_secs(10)));
        let e = serve(&l, 2, b"id", Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1 has world size 3, rank 0 has 2"), "{e}");
        let c = client.join().unwrap().unwrap_err().to_string();
        assert!(c.contains("refused rank 1"), "{c}");
    }

    /// This machine's address on its default route (no packet is sent: connecting a UDP
    /// socket only picks the source address), if it has a non-loopback one.
    fn non_loopback_address() -> Option<std::net::IpAddr> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        s.connect("192.0.2.1:9").ok()?; // TEST-NET-1: routed like any remote host
        let ip = s.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    }

    #[test]
    fn rank0_listens_on_every_interface_whatever_master_addr_resolves_to() {
        // MASTER_ADDR as the sbatch example sets it: this node's hostname, which Debian's
        // /etc/hosts often maps to 127.0.1.1. Rank 0 must still be reachable on every address.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let l = listen(&host, 0).unwrap();
        let bound = l.local_addr().unwrap();
        assert!(bound.ip().is_unspecified(), "bound {bound}");
        let port = bound.port();
        let mut targets = vec!["127.0.0.1".to_string(), host.clone()];
        match non_loopback_address() {
            Some(ip) => targets.push(ip.to_string()),
            None => eprintln!("note: no non-loopback address here; loopback and {host} only"),
        }
        println!("rank 0 on {bound} (MASTER_ADDR {host}); clients via {targets:?}");
        let n = targets.len();
        let clients: Vec<_> = targets
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                thread::spawn(move || fetch(&t, port, i + 1, n + 1, Duration::from_secs(10)))
            })
            .collect();
        serve(&l, n + 1, b"id", Duration::from_secs(10)).unwrap();
        for c in clients {
            assert_eq!(c.join().unwrap().unwrap(), b"id");
        }
    }

    #[test]
    fn a_stray_connection_is_ignored() {
        let (l, port) = local();
        let stray = thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        });
        let client = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            fetch("127.0.0.1", port, 1, 2, Duration::from_secs(10))
        });
        serve(&l, 2, b"id", Duration::from_secs(10)).unwrap();
        stray.join().unwrap();
        assert_eq!(client.join().unwrap().unwrap(), b"id");
    }
}
