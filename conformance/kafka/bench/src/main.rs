//! kafka-load: the load generator of conformance/kafka/kafka-bench, native
//! code on librdkafka (the `rdkafka` crate), so that on a small machine the
//! CPU goes to the broker under test and not to the client.
//!
//! ```text
//! kafka-load produce --bootstrap HOST:PORT --topic T --partitions N
//!                    --size BYTES --seconds S --producers K [--rate R]
//! kafka-load consume --bootstrap HOST:PORT --topic T --partitions N
//!                    --expected M --timeout S [--consumers C]
//! ```
//!
//! `produce`: K producer instances (one librdkafka client each, sending from
//! its own thread, all in this one process) with acks=all, idempotence on,
//! linger.ms=5. Before the clock starts every producer fetches the topic's
//! metadata and has one record per partition acknowledged (so its
//! connections and its producer id are set up: librdkafka's idempotent
//! producer otherwise often waits for its producer-id timer, about 500 ms,
//! before its first batch); then all start together. Records of `--size`
//! random bytes go round-robin over the partitions for `--seconds`, as fast
//! as the client queue allows or, with `--rate`, at R records/s in all (each
//! producer sends record i at start + i / (R / K), catching up if late).
//! The latency of a record is from its `produce()` call to its delivery
//! report. Afterwards each producer flushes (up to 60 s). One JSON line on
//! stdout:
//!
//! ```text
//! {"acked":N,"errors":N,"elapsed_s":F,"p50_ms":F,"p99_ms":F}
//! ```
//!
//! errors = failed deliveries + records still undelivered after the flush;
//! elapsed_s = first produce to last acknowledgement; p50/p99 over every
//! acknowledged record (null when none was).
//!
//! `consume`: C consumers (default min(N, 2)), consumer k assigned the
//! partitions k, k + C, ... from offset 0 (assign, no group membership:
//! Tansu completes a JoinGroup only at the rebalance timeout). They count
//! records until M have arrived in all or `--timeout` seconds pass. One JSON
//! line: `{"got":N,"elapsed_s":F}`, elapsed from the first record received
//! to the last (0 when none was).
//!
//! Errors go to stderr with exit status 1 (2 for bad arguments).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde_json::json;

type Res<T> = Result<T, String>;

// ---------------------------------------------------------------- arguments

/// `--name value` pairs after the subcommand.
struct Args {
    map: HashMap<String, String>,
}

impl Args {
    fn parse(rest: &[String]) -> Res<Args> {
        let mut map = HashMap::new();
        let mut it = rest.iter();
        while let Some(flag) = it.next() {
            let name = flag
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {flag:?}"))?;
            let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            map.insert(name.to_string(), value.clone());
        }
        Ok(Args { map })
    }

    /// The value of `--name`, or `default` when absent (an error when absent
    /// and there is no default).
    fn get<T: FromStr>(&self, name: &str, default: Option<T>) -> Res<T> {
        match self.map.get(name) {
            Some(v) => v.parse().map_err(|_| format!("--{name}: bad value {v:?}")),
            None => default.ok_or_else(|| format!("--{name} is required")),
        }
    }

    fn opt<T: FromStr>(&self, name: &str) -> Res<Option<T>> {
        self.map.get(name).map(|_| self.get(name, None)).transpose()
    }

    /// Refuses flags the subcommand does not know (a typo would otherwise
    /// silently fall back to a default).
    fn only(&self, known: &[&str]) -> Res<()> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!("unknown option --{k}")),
            None => Ok(()),
        }
    }
}

const USAGE: &str = "usage:
  kafka-load produce --bootstrap HOST:PORT --topic T --partitions N --size BYTES --seconds S --producers K [--rate R]
  kafka-load consume --bootstrap HOST:PORT --topic T --partitions N --expected M --timeout S [--consumers C]";

/// What to run, from the command line.
enum Command {
    Produce(ProduceOpts),
    Consume(ConsumeOpts),
}

fn parse_command(argv: &[String]) -> Res<Command> {
    match argv.split_first() {
        Some((cmd, rest)) if cmd == "produce" => {
            ProduceOpts::from_args(&Args::parse(rest)?).map(Command::Produce)
        }
        Some((cmd, rest)) if cmd == "consume" => {
            ConsumeOpts::from_args(&Args::parse(rest)?).map(Command::Consume)
        }
        _ => Err("a subcommand (produce or consume) is required".to_string()),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_command(&argv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kafka-load: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let (name, result) = match &command {
        Command::Produce(o) => ("produce", produce(o)),
        Command::Consume(o) => ("consume", consume(o)),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kafka-load {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- shared

/// Surfaces librdkafka's errors on stderr (rdkafka hands them to the `log`
/// crate by default, which has no logger here, so they would be lost).
fn report_log(level: RDKafkaLogLevel, fac: &str, msg: &str) {
    if (level as i32) <= (RDKafkaLogLevel::Error as i32) {
        eprintln!("kafka-load: librdkafka {fac}: {msg}");
    }
}

/// The consumers' context: it only reports errors.
struct Quiet;

impl ConsumerContext for Quiet {}

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        report_log(level, fac, msg);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        eprintln!("kafka-load: librdkafka: {error}: {reason}");
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Seconds from the earliest start to the latest finish (0 without both).
fn span(first: Option<Instant>, last: Option<Instant>) -> f64 {
    match (first, last) {
        (Some(f), Some(l)) => secs(l.saturating_duration_since(f)),
        _ => 0.0,
    }
}

// ---------------------------------------------------------------- produce

struct ProduceOpts {
    bootstrap: String,
    topic: String,
    partitions: usize,
    size: usize,
    seconds: f64,
    producers: usize,
    /// Records/s over all producers; None: as fast as possible.
    rate: Option<f64>,
}

impl ProduceOpts {
    fn from_args(a: &Args) -> Res<ProduceOpts> {
        a.only(&[
            "bootstrap",
            "topic",
            "partitions",
            "size",
            "seconds",
            "producers",
            "rate",
        ])?;
        let o = ProduceOpts {
            bootstrap: a.get("bootstrap", None)?,
            topic: a.get("topic", None)?,
            partitions: a.get("partitions", None)?,
            size: a.get("size", None)?,
            seconds: a.get("seconds", None)?,
            producers: a.get("producers", None)?,
            rate: a.opt("rate")?,
        };
        if o.partitions == 0 || o.producers == 0 {
            return Err("--partitions and --producers must be at least 1".into());
        }
        let bad = |x: f64| !x.is_finite() || x < 0.0;
        if bad(o.seconds) || o.rate.is_some_and(|r| bad(r) || r == 0.0) {
            return Err("--seconds must be >= 0 and --rate > 0".into());
        }
        Ok(o)
    }
}

/// What one producer's delivery reports have added up to.
#[derive(Default)]
struct Tally {
    acked: u64,
    failed: u64,
    first_error: Option<String>,
    last_ack: Option<Instant>,
    /// Per acknowledged record, produce() to delivery report, nanoseconds.
    latencies_ns: Vec<u64>,
}

/// Producer context. Its delivery-report callback runs on the producer's
/// polling thread (ThreadedProducer: a thread blocked in librdkafka's event
/// queue, woken as each report arrives, so the acknowledgement instant is
/// taken promptly without the sending thread having to poll, and without
/// busy-waiting: librdkafka's poll timeouts are whole milliseconds); the
/// sending thread only reads the tally after the flush.
struct Ctx {
    /// Time origin of the delivery opaques.
    base: Instant,
    tally: Mutex<Tally>,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        report_log(level, fac, msg);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        eprintln!("kafka-load: librdkafka: {error}: {reason}");
    }
}

impl ProducerContext for Ctx {
    /// The instant of the record's produce() call, as nanoseconds since
    /// `base`: per-record state without an allocation per record.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_ns: usize) {
        let now = Instant::now();
        let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(_) => {
                t.acked += 1;
                t.last_ack = Some(now);
                let now_ns = now.duration_since(self.base).as_nanos() as u64;
                t.latencies_ns.push(now_ns.saturating_sub(sent_ns as u64));
            }
            Err((e, _)) => {
                t.failed += 1;
                if t.first_error.is_none() {
                    t.first_error = Some(e.to_string());
                }
            }
        }
    }
}

/// One producer's outcome.
struct Produced {
    acked: u64,
    errors: u64,
    start: Instant,
    last_ack: Option<Instant>,
    latencies_ns: Vec<u64>,
}

fn new_producer(o: &ProduceOpts) -> Res<ThreadedProducer<Ctx>> {
    ClientConfig::new()
        .set("bootstrap.servers", &o.bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.kbytes", (64 * 1024).to_string())
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "60000")
        .create_with_context(Ctx {
            base: Instant::now(),
            tally: Mutex::default(),
        })
        .map_err(|e| format!("creating a producer: {e}"))
}

/// Metadata, then one acknowledged record per partition, before the clock.
fn warm_up(p: &ThreadedProducer<Ctx>, o: &ProduceOpts) -> Res<()> {
    let timeout = Duration::from_secs(30);
    let md = p
        .client()
        .fetch_metadata(Some(&o.topic), timeout)
        .map_err(|e| format!("metadata of {}: {e}", o.topic))?;
    let topic = md
        .topics()
        .iter()
        .find(|t| t.name() == o.topic)
        .ok_or_else(|| format!("topic {} not in the metadata", o.topic))?;
    if let Some(e) = topic.error() {
        return Err(format!(
            "metadata of {}: {:?}",
            o.topic,
            RDKafkaErrorCode::from(e)
        ));
    }
    if topic.partitions().len() < o.partitions {
        return Err(format!(
            "topic {} has {} partitions in the metadata, expected {}",
            o.topic,
            topic.partitions().len(),
            o.partitions
        ));
    }
    for part in 0..o.partitions {
        let rec = BaseRecord::<(), [u8], usize>::with_opaque_to(&o.topic, 0)
            .partition(part as i32)
            .payload(&b"warm-up"[..]);
        p.send(rec)
            .map_err(|(e, _)| format!("warm-up produce: {e}"))?;
    }
    p.flush(timeout)
        .map_err(|e| format!("warm-up records not acknowledged within 30 s: {e}"))?;
    // Start the measurement from an empty tally.
    let t = std::mem::take(&mut *p.context().tally.lock().unwrap_or_else(|e| e.into_inner()));
    if t.failed > 0 || t.acked < o.partitions as u64 {
        return Err(format!(
            "warm-up: {} of {} records acknowledged ({})",
            t.acked,
            o.partitions,
            t.first_error.unwrap_or_default()
        ));
    }
    Ok(())
}

/// The measured part of one producer: `id` picks the first partition so
/// that producers do not move in lockstep over the same partitions.
fn run_producer(
    p: &ThreadedProducer<Ctx>,
    o: &ProduceOpts,
    id: usize,
    payload: &[u8],
) -> Res<Produced> {
    let base = p.context().base;
    // Seconds between two records of this producer, when paced.
    let interval = o.rate.map(|r| o.producers as f64 / r);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(o.seconds);
    let mut next = id; // round-robin position over the partitions
    let mut sent: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if let Some(iv) = interval {
            // By schedule, not by sleeping a fixed amount: record `sent` is
            // due at start + sent * interval (a late producer catches up).
            let due = start + Duration::from_secs_f64(sent as f64 * iv);
            if now < due {
                thread::sleep(due - now);
                continue;
            }
        }
        let sent_ns = now.duration_since(base).as_nanos() as usize;
        let rec = BaseRecord::<(), [u8], usize>::with_opaque_to(&o.topic, sent_ns)
            .partition((next % o.partitions) as i32)
            .payload(payload);
        match p.send(rec) {
            Ok(()) => {
                next += 1;
                sent += 1;
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                // librdkafka's queue is full (queue.buffering.max.*): let
                // the broker and the polling thread drain it a little.
                thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(format!("produce: {e}")),
        }
    }
    // Whatever is still undelivered after the flush counts as an error.
    let _ = p.flush(Duration::from_secs(60));
    let undelivered = p.in_flight_count().max(0) as u64;
    let t = std::mem::take(&mut *p.context().tally.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(e) = &t.first_error {
        eprintln!(
            "kafka-load: producer {id}: {} failed deliveries, first: {e}",
            t.failed
        );
    }
    if undelivered > 0 {
        eprintln!(
            "kafka-load: producer {id}: {undelivered} records undelivered after a 60 s flush"
        );
    }
    Ok(Produced {
        acked: t.acked,
        errors: t.failed + undelivered,
        start,
        last_ack: t.last_ack,
        latencies_ns: t.latencies_ns,
    })
}

fn random_bytes(n: usize) -> Res<Vec<u8>> {
    let mut v = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut v))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(v)
}

fn produce(o: &ProduceOpts) -> Res<String> {
    let payload = random_bytes(o.size)?;
    let barrier = Barrier::new(o.producers);
    let failed = AtomicBool::new(false);
    let results: Vec<Res<Option<Produced>>> = thread::scope(|s| {
        let handles: Vec<_> = (0..o.producers)
            .map(|id| {
                let (barrier, failed, payload) = (&barrier, &failed, &payload[..]);
                s.spawn(move || -> Res<Option<Produced>> {
                    let ready = new_producer(o).and_then(|p| warm_up(&p, o).map(|()| p));
                    if ready.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    // Every producer reaches the barrier, ready or not, so
                    // that a failed warm-up cannot leave the others waiting.
                    barrier.wait();
                    let p = ready.map_err(|e| format!("producer {id}: {e}"))?;
                    if failed.load(Ordering::SeqCst) {
                        return Ok(None); // another producer failed; it reports
                    }
                    run_producer(&p, o, id, payload).map(Some)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a producer thread panicked".into()))
            })
            .collect()
    });
    let mut done = Vec::new();
    for r in results {
        if let Some(p) = r? {
            done.push(p);
        }
    }
    if done.len() != o.producers {
        return Err("a producer failed".into());
    }

    let acked: u64 = done.iter().map(|p| p.acked).sum();
    let errors: u64 = done.iter().map(|p| p.errors).sum();
    let first = done.iter().map(|p| p.start).min();
    let last = done.iter().filter_map(|p| p.last_ack).max();
    let elapsed = span(first, last);
    let mut lat: Vec<u64> = done.into_iter().flat_map(|p| p.latencies_ns).collect();
    lat.sort_unstable();
    // The same rank rule kafka-bench used: p50 = lat[n/2],
    // p99 = lat[floor(0.99 n) - 1].
    let ms = |i: usize| lat.get(i).map(|&ns| ns as f64 / 1e6);
    let n = lat.len();
    let p50 = ms(n / 2);
    let p99 = ms(((n as f64 * 0.99) as usize).max(1) - 1);
    Ok(
        json!({"acked": acked, "errors": errors, "elapsed_s": elapsed,
              "p50_ms": p50, "p99_ms": p99})
        .to_string(),
    )
}

// ---------------------------------------------------------------- consume

struct ConsumeOpts {
    bootstrap: String,
    topic: String,
    partitions: usize,
    expected: u64,
    timeout: f64,
    consumers: usize,
}

impl ConsumeOpts {
    fn from_args(a: &Args) -> Res<ConsumeOpts> {
        a.only(&[
            "bootstrap",
            "topic",
            "partitions",
            "expected",
            "timeout",
            "consumers",
        ])?;
        let partitions: usize = a.get("partitions", None)?;
        if partitions == 0 {
            return Err("--partitions must be at least 1".into());
        }
        let consumers: usize = a.get("consumers", Some(partitions.min(2)))?;
        Ok(ConsumeOpts {
            bootstrap: a.get("bootstrap", None)?,
            topic: a.get("topic", None)?,
            partitions,
            expected: a.get("expected", None)?,
            timeout: a.get("timeout", None)?,
            // More consumers than partitions would leave some idle.
            consumers: consumers.clamp(1, partitions),
        })
    }
}

/// One consumer's outcome: records counted, first and last arrival.
struct Consumed {
    got: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

fn run_consumer(
    o: &ConsumeOpts,
    k: usize,
    group: &str,
    total: &AtomicU64,
    deadline: Instant,
) -> Res<Consumed> {
    let c: BaseConsumer<Quiet> = ClientConfig::new()
        .set("bootstrap.servers", &o.bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", (50 << 20).to_string())
        .set("max.partition.fetch.bytes", (8 << 20).to_string())
        .set("fetch.wait.max.ms", "100")
        .create_with_context(Quiet)
        .map_err(|e| format!("creating consumer {k}: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for part in (k..o.partitions).step_by(o.consumers) {
        tpl.add_partition_offset(&o.topic, part as i32, Offset::Offset(0))
            .map_err(|e| format!("consumer {k}: partition {part}: {e}"))?;
    }
    c.assign(&tpl)
        .map_err(|e| format!("consumer {k}: assign: {e}"))?;
    let mut out = Consumed {
        got: 0,
        first: None,
        last: None,
    };
    let mut reported = false;
    while total.load(Ordering::Relaxed) < o.expected {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match c.poll((deadline - now).min(Duration::from_millis(100))) {
            Some(Ok(_)) => {
                let t = Instant::now();
                out.first.get_or_insert(t);
                out.last = Some(t);
                out.got += 1;
                total.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err(e)) if !reported => {
                eprintln!("kafka-load: consumer {k}: {e}");
                reported = true;
            }
            _ => {}
        }
    }
    Ok(out)
}

fn consume(o: &ConsumeOpts) -> Res<String> {
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let group = format!("kafka-load-{}-{nonce:x}", std::process::id());
    let deadline = Instant::now() + Duration::from_secs_f64(o.timeout.max(0.0));
    let total = AtomicU64::new(0);
    let results: Vec<Res<Consumed>> = thread::scope(|s| {
        let handles: Vec<_> = (0..o.consumers)
            .map(|k| {
                let (group, total) = (&group, &total);
                s.spawn(move || run_consumer(o, k, group, total, deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a consumer thread panicked".into()))
            })
            .collect()
    });
    let done = results.into_iter().collect::<Res<Vec<_>>>()?;
    let got: u64 = done.iter().map(|c| c.got).sum();
    let first = done.iter().filter_map(|c| c.first).min();
    let last = done.iter().filter_map(|c| c.last).max();
    let elapsed = span(first, last);
    Ok(json!({"got": got, "elapsed_s": elapsed}).to_string())
}
