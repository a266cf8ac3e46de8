//! Load generator of `amqp-bench`: publishes persistent messages with
//! publisher confirms to a durable queue from N producers (one connection
//! and channel each, a bounded window of unconfirmed messages), then drains
//! the queue with one consumer (manual acks). The same program runs against
//! every broker, so only the broker differs between rows.
//!
//! Prints one line of JSON with the results:
//! `{"publish_rps":..,"p50_ms":..,"p99_ms":..,"consume_rps":..}`.
//!
//! ```text
//! amqp-bench-load --uri amqp://guest:guest@127.0.0.1:5672/%2f \
//!     [--producers 1] [--messages 50000] [--size 1024] [--window 256] \
//!     [--prefetch 1000] [--timeout 60]
//! ```

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::Semaphore;

struct Args {
    uri: String,
    producers: usize,
    messages: usize,
    size: usize,
    window: usize,
    prefetch: u16,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        uri: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        producers: 1,
        messages: 50_000,
        size: 1024,
        window: 256,
        prefetch: 1000,
        timeout: Duration::from_secs(60),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "--uri" => a.uri = v,
            "--producers" => a.producers = num(&v)?.max(1),
            "--messages" => a.messages = num(&v)?,
            "--size" => a.size = num(&v)?,
            "--window" => a.window = num(&v)?.max(1),
            "--prefetch" => a.prefetch = num(&v)?.min(65535) as u16,
            "--timeout" => a.timeout = Duration::from_secs(num(&v)? as u64),
            _ => return Err(format!("unknown option {k}")),
        }
    }
    Ok(a)
}

fn props() -> ConnectionProperties {
    ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Publishes `count` messages on its own connection; returns confirm
/// latencies in microseconds.
async fn producer(
    uri: String,
    queue: String,
    count: usize,
    payload: Arc<Vec<u8>>,
    window: usize,
) -> Result<Vec<u32>, BoxError> {
    let conn = Connection::connect(&uri, props()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let lat = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let nacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let permits = Arc::new(Semaphore::new(window));
    let properties = BasicProperties::default().with_delivery_mode(2);
    for _ in 0..count {
        let permit = permits.clone().acquire_owned().await?;
        let t0 = Instant::now();
        let confirm = ch
            .basic_publish(
                "",
                &queue,
                BasicPublishOptions::default(),
                &payload,
                properties.clone(),
            )
            .await?;
        let lat = lat.clone();
        let nacks = nacks.clone();
        tokio::spawn(async move {
            match confirm.await {
                Ok(c) if c.is_ack() => {
                    let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    lat.lock().unwrap().push(us);
                }
                _ => {
                    nacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    // Every permit back: every confirm arrived.
    let _all = permits.acquire_many(window as u32).await?;
    let n = nacks.load(std::sync::atomic::Ordering::Relaxed);
    let _ = conn.close(200, "bye").await;
    if n > 0 {
        return Err(format!("{n} publishes were nacked or failed").into());
    }
    let v = std::mem::take(&mut *lat.lock().unwrap());
    Ok(v)
}

/// Consumes `count` messages (manual acks, `multiple` every 100).
async fn consumer(uri: String, queue: String, count: usize, prefetch: u16) -> Result<(), BoxError> {
    let conn = Connection::connect(&uri, props()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut c = ch
        .basic_consume(
            &queue,
            "bench",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut got = 0usize;
    while got < count {
        let d = match c.next().await {
            Some(d) => d?,
            None => return Err("consumer cancelled".into()),
        };
        got += 1;
        if got % 100 == 0 || got == count {
            d.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let _ = conn.close(200, "bye").await;
    Ok(())
}

async fn run(a: Args) -> Result<String, BoxError> {
    let queue = format!("amqp-bench-{}", std::process::id());
    let setup = Connection::connect(&a.uri, props()).await?;
    let ch = setup.create_channel().await?;
    ch.queue_declare(
        &queue,
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    let payload: Arc<Vec<u8>> = Arc::new((0..a.size).map(|i| b'a' + (i % 26) as u8).collect());

    let per = a.messages / a.producers;
    let total = per * a.producers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.producers {
        tasks.push(tokio::spawn(producer(
            a.uri.clone(),
            queue.clone(),
            per,
            payload.clone(),
            a.window,
        )));
    }
    let mut lat = Vec::with_capacity(total);
    for t in tasks {
        lat.extend(t.await??);
    }
    let publish_s = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };

    let start = Instant::now();
    consumer(a.uri.clone(), queue.clone(), total, a.prefetch).await?;
    let consume_s = start.elapsed().as_secs_f64();

    let _ = ch.queue_delete(&queue, QueueDeleteOptions::default()).await;
    let _ = setup.close(200, "bye").await;
    Ok(format!(
        "{{\"messages\":{},\"producers\":{},\"publish_s\":{:.3},\"publish_rps\":{:.0},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"consume_s\":{:.3},\"consume_rps\":{:.0}}}",
        total,
        a.producers,
        publish_s,
        total as f64 / publish_s,
        pct(0.50),
        pct(0.99),
        consume_s,
        total as f64 / consume_s
    ))
}

#[tokio::main]
async fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("amqp-bench-load: {e}");
            return ExitCode::from(2);
        }
    };
    let timeout = a.timeout;
    match tokio::time::timeout(timeout, run(a)).await {
        Ok(Ok(line)) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("amqp-bench-load: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("amqp-bench-load: not done within {timeout:?}");
            ExitCode::FAILURE
        }
    }
}
