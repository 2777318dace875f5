//! `keelmq bench`: an end-to-end load tool that speaks the RocketMQ 5
//! protocol, so it measures this broker or any other endpoint of the
//! protocol (an Apache RocketMQ 5 proxy, for a comparison).
//!
//! `send` runs `concurrency` senders, each waiting for its previous send's
//! acknowledgement, for a count or a duration, and prints messages/s, MB/s
//! and send-latency percentiles. `consume` receives and acks with a
//! simple-consumer group and prints the end-to-end latency (store time of
//! arrival minus the producer's born timestamp, on the same machine).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use keelmq_proto::rocketmq::v2 as pb;
use keelmq_proto::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use tonic::transport::Channel;

use super::unary::{UnaryConn, host_port};
use crate::coalesce::Coalescing;

const SEND_MESSAGE: &str = "/apache.rocketmq.v2.MessagingService/SendMessage";

/// What to run.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Send messages and measure acknowledged throughput and latency.
    Send(SendArgs),
    /// Receive and ack messages and measure end-to-end latency.
    Consume(ConsumeArgs),
}

/// Where and what.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Client endpoint (host:port) of the broker or proxy.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub endpoint: String,
    /// Topic (must exist, or the broker must create topics on first use).
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Concurrent senders or receivers.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Stop after this many messages (whichever comes first).
    #[arg(long)]
    pub count: Option<u64>,
    /// HTTP/2 connections to spread the work over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
}

#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub common: Common,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Messages per SendMessage request.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Target rate in messages per second over all senders (default: as
    /// fast as they go). Requests are released at even intervals on one
    /// schedule, each to a free sender; the report says how far behind
    /// that schedule the senders fell.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: Option<u64>,
}

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Consumer group.
    #[arg(long, default_value = "bench-consumer")]
    pub group: String,
    /// Messages per receive.
    #[arg(long, default_value_t = 32)]
    pub batch: i32,
}

fn with_id<T>(msg: T, id: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = id.parse() {
        r.metadata_mut().insert("x-mq-client-id", v);
    }
    r
}

async fn channels(c: &Common, n: usize) -> Result<Vec<MessagingServiceClient<Channel>>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        // Requests are coalesced into fewer writes as the broker does with
        // its responses, so the load tool spends less of the machine's CPU
        // on system calls than a client writing each request alone.
        let connector = tower::service_fn(|uri: tonic::transport::Uri| async move {
            let (host, port) = host_port(&uri);
            let stream = tokio::net::TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(Coalescing::new(stream)))
        });
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.endpoint))
            .context("endpoint")?
            .connect_with_connector(connector)
            .await
            .with_context(|| format!("connecting to {}", c.endpoint))?;
        out.push(
            MessagingServiceClient::new(ch)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
        );
    }
    Ok(out)
}

/// Releases requests at even intervals on one schedule, from a thread that
/// waits with the system's fine-grained timer. (With tokio's timer, whose
/// granularity is a millisecond, every sender whose turn fell within the
/// same millisecond was released at once: the load came in bursts.)
struct Pacer {
    shared: Arc<PacerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct PacerShared {
    permits: tokio::sync::Semaphore,
    started: Instant,
    /// Time between two requests' turns.
    period: Duration,
    /// Turns taken so far (the next turn's number).
    taken: AtomicU64,
    stop: std::sync::atomic::AtomicBool,
}

/// The shortest the pacer sleeps: turns due sooner are released together.
const PACER_TICK: Duration = Duration::from_micros(100);

impl Pacer {
    fn start(started: Instant, deadline: Instant, batch: u64, rate: u64) -> Pacer {
        let shared = Arc::new(PacerShared {
            permits: tokio::sync::Semaphore::new(0),
            started,
            period: Duration::from_secs_f64(batch as f64 / rate as f64),
            taken: AtomicU64::new(0),
            stop: Default::default(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                let mut released = 0u64;
                // Ends at the deadline, when dropped, or when the senders
                // need no more turns (they close the permits).
                while !s.stop.load(Ordering::Acquire) && !s.permits.is_closed() {
                    // Turn k is due at `started + k * period`; release every
                    // turn due by now (never past the deadline).
                    let now = Instant::now();
                    let until = now.min(deadline);
                    let due = until.saturating_duration_since(s.started).as_secs_f64()
                        / s.period.as_secs_f64();
                    let due = due as u64 + 1;
                    if due > released {
                        s.permits.add_permits((due - released) as usize);
                        released = due;
                    }
                    if now >= deadline {
                        break;
                    }
                    let next = (s.started + s.period.mul_f64(released as f64)).min(deadline);
                    std::thread::park_timeout(next.saturating_duration_since(now).max(PACER_TICK));
                }
                s.permits.close();
            })
            .ok();
        if thread.is_none() {
            // Without the thread nobody would release a turn: end at once.
            shared.permits.close();
        }
        Pacer { shared, thread }
    }

    fn handle(&self) -> Arc<PacerShared> {
        self.shared.clone()
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl PacerShared {
    /// Waits for the next turn; how late it was taken, or `None` once the
    /// run is over.
    async fn turn(&self) -> Option<Duration> {
        self.permits.acquire().await.ok()?.forget();
        let n = self.taken.fetch_add(1, Ordering::Relaxed);
        let due = self.started + self.period.mul_f64(n as f64);
        Some(Instant::now().saturating_duration_since(due))
    }
}

/// Writes a message id unique to the run: the sequence number and the
/// sender, in upper-case hex (24 digits), reusing `out`'s allocation.
fn message_id(out: &mut String, seq: u64, sender: u32) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.clear();
    for shift in (0..16).rev() {
        out.push(char::from(HEX[(seq >> (shift * 4)) as usize & 0xf]));
    }
    for shift in (0..8).rev() {
        out.push(char::from(HEX[(sender >> (shift * 4)) as usize & 0xf]));
    }
}

fn pct(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Duration::from_micros(sorted[i])
}

fn now_ms() -> i64 {
    crate::store::now_ms()
}

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Runs a bench command and prints its report.
pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Send(a) => send(a).await,
        BenchCommand::Consume(a) => consume(a).await,
    }
}

/// The ids of the topic's writable queues, from the broker's route. Senders
/// spread over them as clients do (sender `w` writes to the `w`-th, round
/// robin). Empty when the broker gives no route (an unknown topic): the
/// sends then report why.
async fn write_queues(c: &Common) -> Result<Vec<i32>> {
    let mut client = channels(c, 1).await?.remove(0);
    let req = pb::QueryRouteRequest {
        topic: Some(pb::Resource {
            resource_namespace: String::new(),
            name: c.topic.clone(),
        }),
        endpoints: None,
    };
    let route = client
        .query_route(with_id(req, &format!("bench@{}", std::process::id())))
        .await
        .map_err(|s| anyhow::anyhow!("query route: {s}"))?
        .into_inner();
    if route.status.as_ref().map(|s| s.code) != Some(pb::Code::Ok as i32) {
        return Ok(Vec::new());
    }
    let writable = [
        pb::Permission::Write as i32,
        pb::Permission::ReadWrite as i32,
    ];
    Ok(route
        .message_queues
        .iter()
        .filter(|q| writable.contains(&q.permission))
        .map(|q| q.id)
        .collect())
}

async fn send(a: SendArgs) -> Result<()> {
    let c = a.common.clone();
    let queues = write_queues(&c).await?;
    let mut conns = Vec::new();
    for i in 0..c.connections.max(1) {
        let id = format!("bench@{}#{i}", std::process::id());
        conns.push(UnaryConn::connect(&c.endpoint, &id).await?);
    }
    let limit = c.count.unwrap_or(u64::MAX);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(c.duration_secs);
    let issued = Arc::new(AtomicU64::new(0));
    let body = bytes::Bytes::from(vec![b'k'; a.size]);
    let mut tasks = Vec::new();
    let senders = c.concurrency.max(1);
    let batch = a.batch.max(1) as u64;
    let pacer = a.rate.map(|r| Pacer::start(started, deadline, batch, r));
    for w in 0..senders {
        let conn = conns[w % conns.len()].clone();
        let (topic, body, issued) = (c.topic.clone(), body.clone(), issued.clone());
        let pacer = pacer.as_ref().map(Pacer::handle);
        let rpc = conn.rpc(SEND_MESSAGE)?;
        let queue_id = if queues.is_empty() {
            0
        } else {
            queues[w % queues.len()]
        };
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut behind = Duration::ZERO;
            let template = pb::Message {
                topic: Some(pb::Resource {
                    resource_namespace: String::new(),
                    name: topic,
                }),
                user_properties: Default::default(),
                system_properties: Some(pb::SystemProperties {
                    message_type: pb::MessageType::Normal as i32,
                    queue_id,
                    ..Default::default()
                }),
                body,
            };
            let mut req = pb::SendMessageRequest {
                messages: vec![template; batch as usize],
            };
            while Instant::now() < deadline {
                if let Some(p) = &pacer {
                    match p.turn().await {
                        Some(_) if Instant::now() >= deadline => break,
                        Some(late) => behind = behind.max(late),
                        None => break,
                    }
                }
                let first = issued.fetch_add(batch, Ordering::Relaxed);
                if first >= limit {
                    // The count is reached: no sender needs another turn.
                    if let Some(p) = &pacer {
                        p.permits.close();
                    }
                    break;
                }
                let n = batch.min(limit - first);
                // The request's messages are kept between requests; only
                // their ids and born timestamps change.
                req.messages.truncate(n as usize);
                let born = Some(ts(now_ms()));
                for (i, m) in req.messages.iter_mut().enumerate() {
                    if let Some(sp) = m.system_properties.as_mut() {
                        message_id(&mut sp.message_id, first + i as u64, w as u32);
                        sp.born_timestamp = born;
                    }
                }
                let t = Instant::now();
                let resp: pb::SendMessageResponse =
                    conn.call(&rpc, &req).await.context("send failed")?;
                let status = resp.status.unwrap_or_default();
                if status.code != pb::Code::Ok as i32 {
                    let name =
                        pb::Code::try_from(status.code).map_or("unknown", |c| c.as_str_name());
                    bail!("send refused: {name} ({}): {}", status.code, status.message);
                }
                lat.push((t.elapsed().as_micros() as u64, n));
            }
            Ok::<_, anyhow::Error>((lat, behind))
        }));
    }
    let mut lat = Vec::new();
    let mut sent = 0u64;
    let mut behind = Duration::ZERO;
    for t in tasks {
        let (sender_lat, sender_behind) = t.await.context("sender task")??;
        behind = behind.max(sender_behind);
        for (us, n) in sender_lat {
            lat.push(us);
            sent += n;
        }
    }
    drop(pacer);
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    println!(
        "send: endpoint {} topic {} ({} queues) concurrency {} connections {} size {} B batch {} rate {}",
        c.endpoint,
        c.topic,
        queues.len(),
        c.concurrency,
        c.connections,
        a.size,
        a.batch,
        a.rate.map_or("unlimited".into(), |r| format!("{r} msg/s"))
    );
    println!(
        "  {sent} messages in {secs:.2} s: {:.0} msg/s, {:.1} MB/s",
        sent as f64 / secs,
        sent as f64 * a.size as f64 / 1e6 / secs
    );
    println!(
        "  send latency (per request): p50 {:?}  p99 {:?}  p999 {:?}  max {:?}",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        pct(&lat, 1.0)
    );
    if a.rate.is_some() {
        println!("  senders fell behind their schedule by at most {behind:?}");
    }
    Ok(())
}

async fn consume(a: ConsumeArgs) -> Result<()> {
    let c = a.common.clone();
    let clients = channels(&c, c.connections).await?;
    let limit = c.count.unwrap_or(u64::MAX);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(c.duration_secs);
    let received = Arc::new(AtomicU64::new(0));
    // When the last ack completed (µs after the start): receivers left in a
    // long poll once everything was consumed do not count.
    let last_ack_us = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..c.concurrency.max(1) {
        let mut client = clients[w % clients.len()].clone();
        let (topic, group, received, last_ack_us) = (
            c.topic.clone(),
            a.group.clone(),
            received.clone(),
            last_ack_us.clone(),
        );
        let batch = a.batch;
        tasks.push(tokio::spawn(async move {
            let id = format!("bench-consumer@{}#{w}", std::process::id());
            let mut e2e = Vec::new();
            while Instant::now() < deadline && received.load(Ordering::Relaxed) < limit {
                let req = pb::ReceiveMessageRequest {
                    group: Some(pb::Resource {
                        resource_namespace: String::new(),
                        name: group.clone(),
                    }),
                    message_queue: Some(pb::MessageQueue {
                        topic: Some(pb::Resource {
                            resource_namespace: String::new(),
                            name: topic.clone(),
                        }),
                        ..Default::default()
                    }),
                    filter_expression: None,
                    batch_size: batch,
                    invisible_duration: Some(prost_types::Duration {
                        seconds: 30,
                        nanos: 0,
                    }),
                    auto_renew: false,
                    long_polling_timeout: Some(prost_types::Duration {
                        seconds: 5,
                        nanos: 0,
                    }),
                    attempt_id: None,
                };
                let mut r = with_id(req, &id);
                r.set_timeout(Duration::from_secs(10));
                let mut stream = client
                    .receive_message(r)
                    .await
                    .map_err(|s| anyhow::anyhow!("receive: {s}"))?
                    .into_inner();
                let mut entries = Vec::new();
                while let Some(frame) = stream
                    .message()
                    .await
                    .map_err(|s| anyhow::anyhow!("receive: {s}"))?
                {
                    if let Some(pb::receive_message_response::Content::Message(m)) = frame.content
                        && let Some(sp) = m.system_properties
                    {
                        if let Some(b) = sp.born_timestamp {
                            let born = b.seconds * 1000 + i64::from(b.nanos) / 1_000_000;
                            e2e.push((now_ms() - born).max(0) as u64 * 1000);
                        }
                        entries.push(pb::AckMessageEntry {
                            message_id: sp.message_id,
                            receipt_handle: sp.receipt_handle.unwrap_or_default(),
                            lite_topic: None,
                        });
                    }
                }
                if entries.is_empty() {
                    continue;
                }
                received.fetch_add(entries.len() as u64, Ordering::Relaxed);
                let ack = pb::AckMessageRequest {
                    group: Some(pb::Resource {
                        resource_namespace: String::new(),
                        name: group.clone(),
                    }),
                    topic: Some(pb::Resource {
                        resource_namespace: String::new(),
                        name: topic.clone(),
                    }),
                    entries,
                };
                client
                    .ack_message(with_id(ack, &id))
                    .await
                    .map_err(|s| anyhow::anyhow!("ack: {s}"))?;
                last_ack_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(e2e)
        }));
    }
    let mut e2e = Vec::new();
    for t in tasks {
        e2e.extend(t.await.context("receiver task")??);
    }
    let secs = match last_ack_us.load(Ordering::Relaxed) {
        0 => started.elapsed().as_secs_f64(),
        us => us as f64 / 1e6,
    };
    e2e.sort_unstable();
    println!(
        "consume: endpoint {} topic {} group {} concurrency {} batch {}",
        c.endpoint, c.topic, a.group, c.concurrency, a.batch
    );
    println!(
        "  {} messages in {secs:.2} s: {:.0} msg/s",
        e2e.len(),
        e2e.len() as f64 / secs
    );
    println!(
        "  end-to-end latency (born to received, ms resolution): p50 {:?}  p99 {:?}  p999 {:?}",
        pct(&e2e, 0.5),
        pct(&e2e, 0.99),
        pct(&e2e, 0.999)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pacer_never_exceeds_its_rate_and_ends_at_the_deadline() {
        let started = Instant::now();
        // 10 ms between turns for 300 ms.
        let pacer = Pacer::start(started, started + Duration::from_millis(300), 2, 200);
        let turns = pacer.handle();
        let mut n = 0;
        while turns.turn().await.is_some() {
            n += 1;
        }
        assert!(Instant::now() >= started + Duration::from_millis(300));
        // The first turn at once, then one per period up to the deadline.
        assert!((1..=31).contains(&n), "{n} turns");
        drop(pacer);
    }

    #[tokio::test]
    async fn a_period_longer_than_the_run_still_ends_at_the_deadline() {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(200);
        // One turn per 30 s (batches of 30 at 1 msg/s), a 200 ms run.
        let pacer = Pacer::start(started, deadline, 30, 1);
        let turns = pacer.handle();
        let mut n = 0;
        while turns.turn().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 1, "only the first turn falls inside the run");
        // Generous bound: the run ends at its deadline, not at the next
        // turn 30 s later.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "ended after {:?}",
            started.elapsed()
        );
        drop(pacer);
    }

    #[test]
    fn message_ids_are_fixed_width_hex() {
        let mut id = String::from("leftover");
        message_id(&mut id, 0x1f, 3);
        assert_eq!(id, format!("{:016X}{:08X}", 0x1f, 3));
        message_id(&mut id, u64::MAX, u32::MAX);
        assert_eq!(id, "F".repeat(24));
    }
}
