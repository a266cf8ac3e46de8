//! mqtt-bench: a small MQTT 3.1.1 load generator (hand-rolled over tokio,
//! so the client costs the same against every broker).
//!
//! ```text
//! mqtt-bench --broker NAME=PORT:PID [--broker ...] [--baseline NAME]
//!            [--seconds 5] [--size 64] [--window 32] [--conns 10000]
//!            [--only TEXT]   (only the load rows whose name contains TEXT)
//!            [--rate 20000,50000]  (deliveries/s of the fixed-rate rows,
//!                                   one set of rows per rate; 0: none)
//! ```
//!
//! For each broker, one after the other:
//! - six load runs: QoS 0 and QoS 1 for fan-in (20 publishers -> 1
//!   subscriber, one topic), fan-out (1 publisher -> 20 subscribers) and
//!   10 point-to-point pairs (one topic each). Publishers run closed-loop:
//!   each keeps at most `--window` messages not yet received by every
//!   subscriber (and, at QoS 1, not yet PUBACKed), so no broker is
//!   overrun and latency is measured at the same offered concurrency.
//!   messages/s counts deliveries to subscribers during the run; the
//!   latency of a delivery is publisher write -> subscriber read (the
//!   payload carries the send time; one process, one clock); broker CPU
//!   is the broker process's user + system time (all threads, from
//!   `/proc/PID/stat`) over the measured seconds per delivered message;
//! - three more QoS 1 runs per fixed rate (`--rate` deliveries/s in all,
//!   rates every broker sustains; each publisher sends on a schedule, still
//!   bounded by the window, woken on time by a pacer thread, and a
//!   message's latency counts from when it was due): latency at the same
//!   load, where the closed-loop rows compare each broker at its own
//!   saturation;
//! - idle memory: `--conns` connections (CONNECT, clean session,
//!   keep-alive 600 s, nothing else) and the broker's RSS
//!   (`/proc/PID/status`) before and after, divided by the count.
//!
//! Prints a Markdown table (ratios against `--baseline`) on stdout. With
//! `MQTT_BENCH_SPREAD` set, each load run also prints its latency
//! percentiles (p50 to p99.9) on stderr, for looking at the tail.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

// ---------------------------------------------------------------- packets

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn connect_pkt(id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(b"MQTT", &mut body);
    body.push(4); // 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&keep_alive.to_be_bytes());
    put_str(id.as_bytes(), &mut body);
    let mut out = vec![0x10];
    varint(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

fn subscribe_pkt(pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    put_str(filter.as_bytes(), &mut body);
    body.push(qos);
    let mut out = vec![0x82];
    varint(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

fn publish_pkt(out: &mut Vec<u8>, topic: &str, qos: u8, pkid: u16, payload: &[u8]) {
    out.push(0x30 | (qos << 1));
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    varint(len, out);
    put_str(topic.as_bytes(), out);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

fn puback_pkt(out: &mut Vec<u8>, pkid: u16) {
    out.extend_from_slice(&[0x40, 2]);
    out.extend_from_slice(&pkid.to_be_bytes());
}

/// Frames packets out of a TCP read half.
struct Reader {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
    pos: usize,
}

impl Reader {
    fn new(rd: OwnedReadHalf) -> Reader {
        Reader {
            rd,
            buf: Vec::with_capacity(64 * 1024),
            pos: 0,
        }
    }

    /// Reads more bytes; false at end of stream. Cancel-safe.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 32 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(16 * 1024);
        Ok(self.rd.read_buf(&mut self.buf).await? > 0)
    }

    /// The next complete packet: (first byte, body range in `buf`).
    fn pop(&mut self) -> Option<(u8, Range<usize>)> {
        let b = &self.buf[self.pos..];
        if b.len() < 2 {
            return None;
        }
        let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
        loop {
            let c = *b.get(i)?;
            len += usize::from(c & 0x7f) * mult;
            mult *= 128;
            i += 1;
            if c & 0x80 == 0 {
                break;
            }
        }
        if b.len() < i + len {
            return None;
        }
        let start = self.pos + i;
        self.pos = start + len;
        Some((b[0], start..start + len))
    }

    async fn next(&mut self) -> io::Result<(u8, Vec<u8>)> {
        loop {
            if let Some((t, r)) = self.pop() {
                return Ok((t, self.buf[r].to_vec()));
            }
            if !self.fill().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

async fn connect(port: u16, id: &str) -> io::Result<(Reader, OwnedWriteHalf)> {
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    let (rd, mut wr) = s.into_split();
    wr.write_all(&connect_pkt(id, 600)).await?;
    let mut r = Reader::new(rd);
    let (t, body) = r.next().await?;
    if t >> 4 != 2 || body.get(1) != Some(&0) {
        return Err(io::Error::other(format!(
            "CONNACK refused: {t:#x} {body:?}"
        )));
    }
    Ok((r, wr))
}

// ---------------------------------------------------------------- load

#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    pubs: usize,
    topics: usize,
    subs_per_topic: usize,
}

const SHAPES: [Shape; 3] = [
    Shape {
        name: "fan-in 20->1",
        pubs: 20,
        topics: 1,
        subs_per_topic: 1,
    },
    Shape {
        name: "fan-out 1->20",
        pubs: 1,
        topics: 1,
        subs_per_topic: 20,
    },
    Shape {
        name: "p2p 10 pairs",
        pubs: 10,
        topics: 10,
        subs_per_topic: 1,
    },
];

struct Run {
    base: Instant,
    delivered: Vec<AtomicU64>,
    wake: Vec<Notify>,
    measuring: AtomicBool,
    stop: AtomicBool,
    counted: AtomicU64,
    lat_us: Mutex<Vec<u32>>,
    /// Fixed rate: when each publisher's next message is due (ns since
    /// `base`; `NONE`: nothing due that the pacer should wake it for).
    next_due: Vec<AtomicU64>,
    /// When the pacer thread will wake next (0 while it is scanning).
    pacer_at: AtomicU64,
    pacer: OnceLock<std::thread::Thread>,
}

const NONE: u64 = u64::MAX;

impl Run {
    /// A publisher's next message is due at `t` (`NONE`: it waits for its
    /// window instead); wakes the pacer if it would sleep past `t`.
    fn due_at(&self, idx: usize, t: u64) {
        self.next_due[idx].store(t, Ordering::SeqCst);
        if t < self.pacer_at.load(Ordering::SeqCst) {
            if let Some(th) = self.pacer.get() {
                th.unpark();
            }
        }
    }
}

/// Wakes each publisher when its next message is due. tokio's timers have
/// a 1 ms resolution, so publishers that paced themselves with them sent
/// late by up to 1 ms, all together at each tick; this thread sleeps
/// with the OS's resolution (tens of microseconds) instead, so that the
/// fixed-rate rows measure brokers and not the client's timer.
fn pacer(run: Arc<Run>) {
    while !run.stop.load(Ordering::Relaxed) {
        run.pacer_at.store(0, Ordering::SeqCst);
        let now = run.base.elapsed().as_nanos() as u64;
        let mut next = now + 1_000_000;
        for (i, d) in run.next_due.iter().enumerate() {
            let t = d.load(Ordering::SeqCst);
            if t <= now {
                if d.compare_exchange(t, NONE, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    run.wake[i].notify_one();
                }
            } else {
                next = next.min(t);
            }
        }
        run.pacer_at.store(next, Ordering::SeqCst);
        // A publisher that set an earlier due time since the scan has
        // unparked this thread (it saw 0), so this returns at once.
        std::thread::park_timeout(Duration::from_nanos(next - now));
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct LoadResult {
    msgs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Broker CPU time (user + system, all threads) per delivered message
    /// during the measured seconds.
    cpu_us: f64,
}

async fn subscriber(
    port: u16,
    id: String,
    topic: String,
    qos: u8,
    run: Arc<Run>,
) -> io::Result<()> {
    let (mut r, mut wr) = connect(port, &id).await?;
    wr.write_all(&subscribe_pkt(1, &topic, qos)).await?;
    let (t, _) = r.next().await?;
    if t >> 4 != 9 {
        return Err(io::Error::other("no SUBACK"));
    }
    tokio::spawn(async move {
        let mut lat = Vec::new();
        let mut out = Vec::new();
        while !run.stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(100), r.fill()).await {
                Ok(Ok(true)) => {}
                Ok(_) => break,
                Err(_) => continue,
            }
            let now = run.base.elapsed().as_nanos() as u64;
            let counting = run.measuring.load(Ordering::Relaxed);
            while let Some((first, range)) = r.pop() {
                if first >> 4 != 3 {
                    continue;
                }
                let b = &r.buf[range];
                let q = (first >> 1) & 3;
                let tlen = usize::from(u16::from_be_bytes([b[0], b[1]]));
                let mut i = 2 + tlen;
                if q > 0 {
                    puback_pkt(&mut out, u16::from_be_bytes([b[i], b[i + 1]]));
                    i += 2;
                }
                let p = &b[i..];
                if p.len() < 12 {
                    continue;
                }
                let idx = u32::from_le_bytes(p[0..4].try_into().unwrap()) as usize;
                let ts = u64::from_le_bytes(p[4..12].try_into().unwrap());
                if let Some(d) = run.delivered.get(idx) {
                    d.fetch_add(1, Ordering::Relaxed);
                    run.wake[idx].notify_one();
                }
                if counting {
                    run.counted.fetch_add(1, Ordering::Relaxed);
                    lat.push((now.saturating_sub(ts) / 1000) as u32);
                }
            }
            if !out.is_empty() {
                if wr.write_all(&out).await.is_err() {
                    break;
                }
                out.clear();
            }
        }
        run.lat_us.lock().unwrap().extend(lat);
    });
    Ok(())
}

async fn publisher(
    port: u16,
    idx: usize,
    topic: String,
    qos: u8,
    size: usize,
    window: u64,
    fan: u64,
    rate: f64,
    run: Arc<Run>,
) -> io::Result<()> {
    let (mut r, mut wr) = connect(port, &format!("bench-p{idx}-{}", std::process::id())).await?;
    let mut payload = vec![0u8; size.max(12)];
    payload[0..4].copy_from_slice(&(idx as u32).to_le_bytes());
    let mut out = Vec::with_capacity(64 * 1024);
    let mut sent: u64 = 0;
    let mut inflight: u64 = 0;
    let mut pkid: u16 = 0;
    // Fixed rate: message k is due at start + k / rate, and its latency
    // counts from then (a broker that holds the window full is charged
    // for the wait too: no coordinated omission).
    let start = run.base.elapsed().as_nanos() as u64;
    let due = |k: u64| start + (k as f64 * 1e9 / rate) as u64;
    while !run.stop.load(Ordering::Relaxed) {
        let delivered = run.delivered[idx].load(Ordering::Relaxed);
        // Whether the next message waits for its time (not the window).
        let mut early = false;
        while sent * fan - delivered.min(sent * fan) < window * fan && inflight < window {
            let now = run.base.elapsed().as_nanos() as u64;
            if rate > 0.0 && due(sent) > now {
                early = true;
                break;
            }
            let ts = if rate > 0.0 { due(sent) } else { now };
            payload[4..12].copy_from_slice(&ts.to_le_bytes());
            pkid = pkid.wrapping_add(1).max(1);
            publish_pkt(&mut out, &topic, qos, pkid, &payload);
            sent += 1;
            if qos > 0 {
                inflight += 1;
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
        if rate > 0.0 {
            // A publisher held by its window is woken by its acks and
            // deliveries, not by the pacer.
            run.due_at(idx, if early { due(sent) } else { NONE });
        }
        let pause = if rate > 0.0 {
            let now = run.base.elapsed().as_nanos() as u64;
            Duration::from_nanos(due(sent).saturating_sub(now).clamp(1, 50_000_000))
        } else {
            Duration::from_millis(50)
        };
        if qos > 0 {
            tokio::select! {
                r = r.fill() => { if !r? { return Err(io::ErrorKind::UnexpectedEof.into()); } }
                _ = run.wake[idx].notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            while let Some((first, _)) = r.pop() {
                if first >> 4 == 4 {
                    inflight = inflight.saturating_sub(1);
                }
            }
        } else {
            tokio::select! {
                _ = run.wake[idx].notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
    Ok(())
}

/// User + system CPU time of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_s() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[allow(clippy::too_many_arguments)]
async fn load(
    port: u16,
    pid: u32,
    shape: Shape,
    qos: u8,
    secs: f64,
    size: usize,
    window: u64,
    rate: f64,
) -> io::Result<LoadResult> {
    let run = Arc::new(Run {
        base: Instant::now(),
        delivered: (0..shape.pubs).map(|_| AtomicU64::new(0)).collect(),
        wake: (0..shape.pubs).map(|_| Notify::new()).collect(),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        counted: AtomicU64::new(0),
        lat_us: Mutex::new(Vec::new()),
        next_due: (0..shape.pubs).map(|_| AtomicU64::new(NONE)).collect(),
        pacer_at: AtomicU64::new(0),
        pacer: OnceLock::new(),
    });
    let pacer_thread = (rate > 0.0).then(|| {
        let r = run.clone();
        let h = std::thread::spawn(move || pacer(r));
        let _ = run.pacer.set(h.thread().clone());
        h
    });
    let tag = format!(
        "{}-{}",
        std::process::id(),
        run.base.elapsed().as_nanos() ^ (port as u128) << 20
    );
    let topic = |t: usize| {
        format!(
            "bench/{tag}/q{qos}/{}/{t}",
            shape.name.split(' ').next().unwrap()
        )
    };
    for t in 0..shape.topics {
        for s in 0..shape.subs_per_topic {
            subscriber(
                port,
                format!("bench-s{t}-{s}-{tag}"),
                topic(t),
                qos,
                run.clone(),
            )
            .await?;
        }
    }
    // Let brokers that create topics lazily settle the subscriptions.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tasks = Vec::new();
    for p in 0..shape.pubs {
        tasks.push(tokio::spawn(publisher(
            port,
            p,
            topic(p % shape.topics),
            qos,
            size,
            window,
            shape.subs_per_topic as u64,
            rate / (shape.subs_per_topic * shape.pubs) as f64,
            run.clone(),
        )));
    }
    // Warm-up, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let cpu0 = cpu_ticks(pid);
    run.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    run.measuring.store(false, Ordering::Relaxed);
    let cpu1 = cpu_ticks(pid);
    let elapsed = t0.elapsed().as_secs_f64();
    run.stop.store(true, Ordering::Relaxed);
    if let Some(h) = pacer_thread {
        h.thread().unpark();
        let _ = h.join();
    }
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(5), t).await {
            Ok(Ok(Err(e))) => eprintln!("publisher: {e}"),
            _ => {}
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = run.counted.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *run.lat_us.lock().unwrap());
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            f64::from(lat[((lat.len() as f64 - 1.0) * p) as usize]) / 1000.0
        }
    };
    if std::env::var_os("MQTT_BENCH_SPREAD").is_some() && !lat.is_empty() {
        // The shape of the tail, for analysis (stderr; not in the table).
        let ps = [0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999];
        let v: Vec<String> = ps
            .iter()
            .map(|&p| format!("p{}={:.2}", p * 100.0, pct(p)))
            .collect();
        eprintln!("spread: {}", v.join(" "));
    }
    let cpu_us = match (cpu0, cpu1) {
        (Some(a), Some(b)) if n > 0 => (b - a) as f64 / clock_ticks_per_s() * 1e6 / n as f64,
        _ => f64::NAN,
    };
    Ok(LoadResult {
        msgs_per_s: n as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_us,
    })
}

// ---------------------------------------------------------------- idle

fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Bytes of broker RSS per idle connection, and how many connected.
async fn idle(port: u16, pid: u32, n: usize) -> io::Result<(f64, usize)> {
    let tag = std::process::id();
    let mut keep = Vec::new();
    for i in 0..100 {
        keep.push(connect(port, &format!("warm-{tag}-{i}")).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss(pid).ok_or_else(|| io::Error::other("no RSS"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conns = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    let mut i = 0;
    while (i < n || !pending.is_empty()) && Instant::now() < deadline {
        while i < n && pending.len() < 200 {
            let id = format!("idle-{tag}-{i}");
            pending.spawn(async move { connect(port, &id).await });
            i += 1;
        }
        match tokio::time::timeout(Duration::from_secs(5), pending.join_next()).await {
            Ok(Some(Ok(Ok(c)))) => conns.push(c),
            Ok(Some(Ok(Err(e)))) => {
                eprintln!("idle connect failed after {} connections: {e}", conns.len());
                break;
            }
            _ => {}
        }
    }
    pending.abort_all();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss(pid).ok_or_else(|| io::Error::other("no RSS"))?;
    let got = conns.len();
    drop(conns);
    drop(keep);
    Ok((after.saturating_sub(before) as f64 / got.max(1) as f64, got))
}

// ---------------------------------------------------------------- main

struct Broker {
    name: String,
    port: u16,
    pid: u32,
}

fn usage() -> ! {
    eprintln!("usage: mqtt-bench --broker NAME=PORT:PID [...] [--baseline NAME] [--seconds S] [--size B] [--window W] [--conns N] [--only TEXT] [--rate R[,R...]] [--repeat N]");
    std::process::exit(2)
}

/// Each number's median over the repetitions (separately: the run with the
/// median p99 need not be the one with the median rate).
fn median(v: &[LoadResult]) -> LoadResult {
    let pick = |f: fn(&LoadResult) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(f).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    LoadResult {
        msgs_per_s: pick(|r| r.msgs_per_s),
        p50_ms: pick(|r| r.p50_ms),
        p99_ms: pick(|r| r.p99_ms),
        cpu_us: pick(|r| r.cpu_us),
    }
}

#[tokio::main]
async fn main() {
    let mut brokers = Vec::new();
    let (mut baseline, mut secs, mut size, mut window, mut conns) =
        (None, 5.0, 64usize, 32u64, 10_000usize);
    let mut only: Option<String> = None;
    let mut rates = vec![20_000.0, 50_000.0];
    let mut repeat = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--broker" => {
                let s = v();
                let (name, rest) = s.split_once('=').unwrap_or_else(|| usage());
                let (port, pid) = rest.split_once(':').unwrap_or_else(|| usage());
                brokers.push(Broker {
                    name: name.into(),
                    port: port.parse().unwrap_or_else(|_| usage()),
                    pid: pid.parse().unwrap_or_else(|_| usage()),
                });
            }
            "--baseline" => baseline = Some(v()),
            "--seconds" => secs = v().parse().unwrap_or_else(|_| usage()),
            "--size" => size = v().parse().unwrap_or_else(|_| usage()),
            "--window" => window = v().parse().unwrap_or_else(|_| usage()),
            "--conns" => conns = v().parse().unwrap_or_else(|_| usage()),
            "--only" => only = Some(v()),
            "--rate" => {
                rates = v()
                    .split(',')
                    .map(|r| r.trim().parse::<f64>().unwrap_or_else(|_| usage()))
                    .filter(|r| *r > 0.0)
                    .collect();
            }
            "--repeat" => repeat = v().parse::<usize>().unwrap_or_else(|_| usage()).max(1),
            _ => usage(),
        }
    }
    if brokers.is_empty() {
        usage();
    }
    // runs[(row, broker)]: one result per repetition; the table shows
    // their medians.
    let mut runs: HashMap<(String, String), Vec<LoadResult>> = HashMap::new();
    let mut idle_res: HashMap<String, (f64, usize)> = HashMap::new();
    let mut rows = Vec::new();
    for shape in SHAPES {
        for qos in [0u8, 1] {
            rows.push((format!("{} QoS {qos}", shape.name), shape, qos, 0.0));
        }
    }
    for &rate in &rates {
        for shape in SHAPES {
            rows.push((
                format!("{} QoS 1 at {rate:.0} msg/s", shape.name),
                shape,
                1,
                rate,
            ));
        }
    }
    rows.retain(|r| only.as_ref().is_none_or(|o| r.0.contains(o.as_str())));
    // Repetitions go round the brokers (a, b, c, a, b, c, ...) so that a
    // noisy stretch of the shared machine falls on all of them.
    for rep in 0..repeat {
        for b in &brokers {
            for (row, shape, qos, rate) in &rows {
                let r = match tokio::time::timeout(
                    Duration::from_secs_f64(secs + 20.0),
                    load(b.port, b.pid, *shape, *qos, secs, size, window, *rate),
                )
                .await
                {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        eprintln!("{} {row}: {e}", b.name);
                        LoadResult {
                            msgs_per_s: 0.0,
                            p50_ms: f64::NAN,
                            p99_ms: f64::NAN,
                            cpu_us: f64::NAN,
                        }
                    }
                    Err(_) => {
                        eprintln!("{} {row}: timed out", b.name);
                        LoadResult {
                            msgs_per_s: 0.0,
                            p50_ms: f64::NAN,
                            p99_ms: f64::NAN,
                            cpu_us: f64::NAN,
                        }
                    }
                };
                eprintln!(
                "{:<24} {:<20} {:>10.0} msg/s  p50 {:>7.2} ms  p99 {:>7.2} ms  cpu {:>6.2} us/msg",
                b.name, row, r.msgs_per_s, r.p50_ms, r.p99_ms, r.cpu_us
            );
                runs.entry((row.clone(), b.name.clone()))
                    .or_default()
                    .push(r);
            }
            if conns > 0 && rep == 0 {
                match idle(b.port, b.pid, conns).await {
                    Ok(x) => {
                        eprintln!(
                            "{:<24} idle: {:.0} B/connection over {} connections",
                            b.name, x.0, x.1
                        );
                        idle_res.insert(b.name.clone(), x);
                    }
                    Err(e) => eprintln!("{} idle: {e}", b.name),
                }
                // Let the broker notice the closed connections.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    let results: HashMap<(String, String), LoadResult> =
        runs.into_iter().map(|(k, v)| (k, median(&v))).collect();
    // ---- table ----
    let base = baseline.unwrap_or_else(|| brokers[0].name.clone());
    let mut t = String::new();
    t.push_str("| load | ");
    for b in &brokers {
        t.push_str(&format!(
            "{0} msg/s | {0} p50 ms | {0} p99 ms | {0} CPU us/msg | ",
            b.name
        ));
    }
    t.push_str(&format!("msg/s vs {base} (per broker) |\n|---|"));
    for _ in &brokers {
        t.push_str("---:|---:|---:|---:|");
    }
    t.push_str("---|\n");
    for (row, _, _, _) in &rows {
        t.push_str(&format!("| {row} | "));
        for b in &brokers {
            let r = results[&(row.clone(), b.name.clone())];
            t.push_str(&format!(
                "{:.0} | {:.2} | {:.2} | {:.2} | ",
                r.msgs_per_s, r.p50_ms, r.p99_ms, r.cpu_us
            ));
        }
        let bm = results
            .get(&(row.clone(), base.clone()))
            .map_or(f64::NAN, |r| r.msgs_per_s);
        let ratios: Vec<String> = brokers
            .iter()
            .filter(|b| b.name != base)
            .map(|b| {
                format!(
                    "{} {:.2}x",
                    b.name,
                    results[&(row.clone(), b.name.clone())].msgs_per_s / bm
                )
            })
            .collect();
        t.push_str(&format!("{} |\n", ratios.join(", ")));
    }
    if conns > 0 {
        t.push_str(&format!(
            "| idle memory (B/connection, {conns} connections) | "
        ));
        for b in &brokers {
            match idle_res.get(&b.name) {
                Some((m, got)) if *got == conns => t.push_str(&format!("{m:.0} | | | | ")),
                Some((m, got)) => t.push_str(&format!("{m:.0} (only {got} connected) | | | | ")),
                None => t.push_str("failed | | | | "),
            }
        }
        let bm = idle_res.get(&base).map_or(f64::NAN, |x| x.0);
        let ratios: Vec<String> = brokers
            .iter()
            .filter(|b| b.name != base)
            .map(|b| {
                format!(
                    "{} {:.2}x",
                    b.name,
                    idle_res.get(&b.name).map_or(f64::NAN, |x| x.0) / bm
                )
            })
            .collect();
        t.push_str(&format!("{} |\n", ratios.join(", ")));
    }
    print!("{t}");
}
