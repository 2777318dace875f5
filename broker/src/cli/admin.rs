//! `keelmq topic|group|status|promote|follow|switchover`: thin commands over
//! the broker admin API that print what the broker answered.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use keelmq_proto::admin as pb;
use keelmq_proto::admin::broker_admin_client::BrokerAdminClient;
use tonic::transport::Channel;

/// Where the broker's admin API listens.
#[derive(Args, Debug, Clone)]
pub struct AdminTarget {
    /// Admin endpoint of the broker (host:port).
    #[arg(
        long,
        short = 'a',
        global = true,
        env = "KEELMQ_ADMIN",
        default_value = "127.0.0.1:8082"
    )]
    pub admin: String,
}

/// How long one admin call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a switchover call may take beyond the wait it asks the master for:
/// the master's flush, its promote call to the target (5 s to connect, 5 s
/// for the call, 5 s to check the target's status after a lost answer) and
/// the network.
const SWITCHOVER_MARGIN: Duration = Duration::from_secs(30);

/// The broker's wait when a switchover asks for none (`timeout_ms` 0).
const SWITCHOVER_DEFAULT_WAIT_MS: u64 = 10_000;

/// The limit on a switchover call that asks the master to wait up to
/// `timeout_ms` for the target: that wait plus [`SWITCHOVER_MARGIN`]. A
/// caller that gives up earlier cannot tell how the switchover ended (it
/// runs to its end on the master).
pub fn switchover_call_timeout(timeout_ms: u64) -> Duration {
    let wait = if timeout_ms == 0 {
        SWITCHOVER_DEFAULT_WAIT_MS
    } else {
        timeout_ms
    };
    Duration::from_millis(wait).saturating_add(SWITCHOVER_MARGIN)
}

impl AdminTarget {
    pub async fn connect(&self) -> Result<BrokerAdminClient<Channel>> {
        self.connect_with_timeout(CALL_TIMEOUT).await
    }

    /// A client whose every call is limited to `timeout`.
    pub async fn connect_with_timeout(
        &self,
        timeout: Duration,
    ) -> Result<BrokerAdminClient<Channel>> {
        let url = if self.admin.starts_with("http://") || self.admin.starts_with("https://") {
            self.admin.clone()
        } else {
            format!("http://{}", self.admin)
        };
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .with_context(|| format!("invalid admin endpoint {url}"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(timeout)
            .connect()
            .await
            .with_context(|| format!("cannot reach the broker admin API at {}", self.admin))?;
        Ok(BrokerAdminClient::new(channel))
    }
}

/// Message types a topic accepts.
#[derive(ValueEnum, Debug, Clone, Copy)]
#[value(rename_all = "UPPER")]
pub enum TopicType {
    Normal,
    Fifo,
    Delay,
    Transaction,
}

impl From<TopicType> for pb::MessageType {
    fn from(t: TopicType) -> Self {
        match t {
            TopicType::Normal => pb::MessageType::Normal,
            TopicType::Fifo => pb::MessageType::Fifo,
            TopicType::Delay => pb::MessageType::Delay,
            TopicType::Transaction => pb::MessageType::Transaction,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Number of queues (default: the broker's default, 8).
        #[arg(long, short = 'q', default_value_t = 0)]
        queues: u32,
        /// Message type the topic accepts.
        #[arg(
            long = "type",
            short = 't',
            value_enum,
            ignore_case = true,
            default_value = "NORMAL"
        )]
        message_type: TopicType,
    },
    /// Grow a topic's queue count.
    Update {
        name: String,
        #[arg(long, short = 'q')]
        queues: u32,
    },
    /// List topics.
    List,
    /// Show a topic's queues and offsets.
    Describe { name: String },
    /// Delete a topic.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List consumer groups (with committed offsets or settings).
    List,
    /// Show a group's retry settings and its offsets, lag and in-flight
    /// messages per queue.
    Describe { name: String },
    /// Set a group's retry settings (what is not given takes the default).
    Set {
        name: String,
        /// Deliveries of a message, the first included, before it moves to
        /// `%DLQ%<group>` (1 to 1000; default 17).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        max_delivery_attempts: Option<u32>,
        /// Wait before each retry: a list of steps, the last repeating
        /// (`1s,5s,30s,2m`), or `exponential:INITIAL,MAX,MULTIPLIER`
        /// (`exponential:100ms,1m,2`). Units: ms, s, m, h. Default:
        /// 1s,5s,10s,30s,1m,2m,...,30m,1h,2h.
        #[arg(long, value_parser = parse_backoff)]
        backoff: Option<Backoff>,
    },
    /// Remove a group's settings: it goes back to the defaults (its offsets stay).
    Reset { name: String },
}

/// A retry back-off given on the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff(pb::group_settings::RetryBackoff);

/// `250ms`, `5s`, `2m`, `1h`, or a number of milliseconds.
fn parse_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 250ms, 5s, 2m, 1h)"))?;
    let factor = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too long"))
}

fn parse_backoff(s: &str) -> Result<Backoff, String> {
    use pb::group_settings::RetryBackoff as B;
    if let Some(rest) = s.strip_prefix("exponential:") {
        let parts: Vec<&str> = rest.split(',').collect();
        let [initial, max, multiplier] = parts[..] else {
            return Err(format!(
                "{s:?}: expected exponential:INITIAL,MAX,MULTIPLIER (like exponential:100ms,1m,2)"
            ));
        };
        let multiplier: f64 = multiplier
            .trim()
            .parse()
            .map_err(|_| format!("{multiplier:?} is not a number"))?;
        return Ok(Backoff(B::Exponential(pb::ExponentialBackoff {
            initial_ms: parse_ms(initial)?,
            max_ms: parse_ms(max)?,
            multiplier,
        })));
    }
    let steps_ms = s.split(',').map(parse_ms).collect::<Result<Vec<_>, _>>()?;
    Ok(Backoff(B::Customized(pb::CustomizedBackoff { steps_ms })))
}

/// How a back-off reads on the command line.
fn backoff_text(b: Option<&pb::group_settings::RetryBackoff>) -> String {
    use pb::group_settings::RetryBackoff as B;
    let d = |ms: u64| match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    };
    match b {
        Some(B::Customized(c)) => c
            .steps_ms
            .iter()
            .map(|&s| d(s))
            .collect::<Vec<_>>()
            .join(","),
        Some(B::Exponential(e)) => format!(
            "exponential:{},{},{}",
            d(e.initial_ms),
            d(e.max_ms),
            e.multiplier
        ),
        None => "-".into(),
    }
}

fn print_group_settings(s: &pb::GroupSettings, configured: bool) {
    println!(
        "max delivery attempts {}{}",
        s.max_delivery_attempts,
        if configured { "" } else { " (defaults)" }
    );
    println!("retry back-off {}", backoff_text(s.retry_backoff.as_ref()));
}

fn type_name(t: i32) -> &'static str {
    match pb::MessageType::try_from(t) {
        Ok(pb::MessageType::Fifo) => "FIFO",
        Ok(pb::MessageType::Delay) => "DELAY",
        Ok(pb::MessageType::Transaction) => "TRANSACTION",
        _ => "NORMAL",
    }
}

fn print_topic(t: &pb::TopicInfo, with_queues: bool) -> String {
    let mut out = format!(
        "{:<40} {:>6} {}\n",
        t.name,
        t.queue_count,
        type_name(t.message_type)
    );
    if with_queues {
        for q in &t.queues {
            let _ = writeln!(
                out,
                "  queue {:>3}  min {:>12}  max {:>12}",
                q.queue_id, q.min_offset, q.max_offset
            );
        }
    }
    out
}

pub async fn topic(target: &AdminTarget, cmd: TopicCommand) -> Result<()> {
    let mut c = target.connect().await?;
    match cmd {
        TopicCommand::Create {
            name,
            queues,
            message_type,
        } => {
            let t = c
                .create_topic(pb::CreateTopicRequest {
                    name,
                    queue_count: queues,
                    message_type: pb::MessageType::from(message_type) as i32,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .topic
                .context("broker returned no topic")?;
            print!("created {}", print_topic(&t, false));
        }
        TopicCommand::Update { name, queues } => {
            let t = c
                .update_topic(pb::UpdateTopicRequest {
                    name,
                    queue_count: queues,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .topic
                .context("broker returned no topic")?;
            print!("updated {}", print_topic(&t, false));
        }
        TopicCommand::List => {
            let topics = c
                .list_topics(pb::ListTopicsRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .topics;
            println!("{:<40} {:>6} TYPE", "TOPIC", "QUEUES");
            for t in topics {
                print!("{}", print_topic(&t, false));
            }
        }
        TopicCommand::Describe { name } => {
            let t = c
                .describe_topic(pb::DescribeTopicRequest { name })
                .await
                .map_err(status_err)?
                .into_inner()
                .topic
                .context("broker returned no topic")?;
            print!("{}", print_topic(&t, true));
        }
        TopicCommand::Delete { name } => {
            c.delete_topic(pb::DeleteTopicRequest { name: name.clone() })
                .await
                .map_err(status_err)?;
            println!("deleted {name}");
        }
    }
    Ok(())
}

pub async fn group(target: &AdminTarget, cmd: GroupCommand) -> Result<()> {
    let mut c = target.connect().await?;
    match cmd {
        GroupCommand::List => {
            let groups = c
                .list_groups(pb::ListGroupsRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .groups;
            println!("{:<40} TOPICS", "GROUP");
            for g in groups {
                println!("{:<40} {}", g.name, g.topics.join(","));
            }
        }
        GroupCommand::Describe { name } => {
            let g = c
                .describe_group(pb::DescribeGroupRequest { name })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("group {}", g.name);
            if let Some(s) = &g.settings {
                print_group_settings(s, g.configured);
            }
            println!(
                "{:<32} {:>5} {:>12} {:>12} {:>10} {:>9}",
                "TOPIC", "QUEUE", "COMMITTED", "MAX", "LAG", "IN-FLIGHT"
            );
            for q in g.queues {
                println!(
                    "{:<32} {:>5} {:>12} {:>12} {:>10} {:>9}",
                    q.topic, q.queue_id, q.committed_offset, q.max_offset, q.lag, q.in_flight
                );
            }
        }
        GroupCommand::Set {
            name,
            max_delivery_attempts,
            backoff,
        } => {
            let s = c
                .set_group(pb::SetGroupRequest {
                    settings: Some(pb::GroupSettings {
                        name: name.clone(),
                        max_delivery_attempts: max_delivery_attempts.unwrap_or(0),
                        retry_backoff: backoff.map(|b| b.0),
                    }),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("group {name} set");
            print_group_settings(&s, true);
        }
        GroupCommand::Reset { name } => {
            c.delete_group(pb::DeleteGroupRequest { name: name.clone() })
                .await
                .map_err(status_err)?;
            println!("group {name} back to the default settings");
        }
    }
    Ok(())
}

pub async fn status(target: &AdminTarget, json: bool) -> Result<()> {
    let mut c = target.connect().await?;
    let s = c
        .status(pb::StatusRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if json {
        println!("{}", status_json(&s));
        return Ok(());
    }
    let role = match pb::Role::try_from(s.role) {
        Ok(pb::Role::Master) => "master",
        Ok(pb::Role::Slave) => "slave",
        _ => "unknown",
    };
    println!("broker      {} ({})", s.broker_id, s.broker_name);
    println!(
        "role        {role}{}",
        if s.writable { ", writable" } else { "" }
    );
    println!("epoch       {}", s.epoch);
    println!(
        "offsets     min {}  max {}  flushed {}  confirmed {}",
        s.min_offset, s.max_offset, s.flushed_offset, s.confirmed_offset
    );
    println!(
        "modes       replication {} (min in-sync {}), flush {}",
        s.replication_mode, s.min_in_sync_replicas, s.flush_mode
    );
    println!("uptime      {:.1} s", s.uptime_ms as f64 / 1000.0);
    if s.failover_redeliveries > 0 {
        println!(
            "failover    {} messages redelivered because the previous master's delivery state was lost",
            s.failover_redeliveries
        );
    }
    println!(
        "slave reads {}: {} records read from slaves, {} read locally instead, {} served to a master",
        s.slave_read_mode,
        s.records_read_from_slaves,
        s.slave_read_fallbacks,
        s.records_served_to_master
    );
    println!("store id    {}", s.store_id);
    if !s.master_address.is_empty() {
        println!("following   {}", s.master_address);
    }
    for sl in &s.slaves {
        println!(
            "slave       {:<20} acked {:>12} lag {:>10} B  {}{}",
            sl.broker_id,
            sl.acked_offset,
            sl.lag_bytes,
            if sl.connected {
                "connected"
            } else {
                "disconnected"
            },
            if sl.in_sync { ", in sync" } else { "" }
        );
    }
    Ok(())
}

fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "broker_name": s.broker_name,
        "broker_id": s.broker_id,
        "role": match pb::Role::try_from(s.role) { Ok(pb::Role::Master) => "master", Ok(pb::Role::Slave) => "slave", _ => "unknown" },
        "epoch": s.epoch,
        "epochs": s.epochs.iter().map(|e| serde_json::json!({"epoch": e.epoch, "start_offset": e.start_offset})).collect::<Vec<_>>(),
        "min_offset": s.min_offset,
        "max_offset": s.max_offset,
        "flushed_offset": s.flushed_offset,
        "confirmed_offset": s.confirmed_offset,
        "master_address": s.master_address,
        "writable": s.writable,
        "replication_mode": s.replication_mode,
        "flush_mode": s.flush_mode,
        "min_in_sync_replicas": s.min_in_sync_replicas,
        "store_id": s.store_id,
        "uptime_ms": s.uptime_ms,
        "failover_redeliveries": s.failover_redeliveries,
        "slave_reads": {
            "mode": s.slave_read_mode,
            "records_read_from_slaves": s.records_read_from_slaves,
            "fallbacks": s.slave_read_fallbacks,
            "records_served_to_master": s.records_served_to_master,
        },
        "slaves": s.slaves.iter().map(|x| serde_json::json!({
            "broker_id": x.broker_id, "address": x.address, "acked_offset": x.acked_offset,
            "lag_bytes": x.lag_bytes, "connected": x.connected, "in_sync": x.in_sync,
        })).collect::<Vec<_>>(),
    })
}

pub async fn promote(target: &AdminTarget, epoch: u64) -> Result<()> {
    let r = target
        .connect()
        .await?
        .promote(pb::PromoteRequest { epoch })
        .await
        .map_err(status_err)?
        .into_inner();
    println!("master of epoch {} from offset {}", r.epoch, r.start_offset);
    Ok(())
}

pub async fn follow(target: &AdminTarget, master: String, epoch: u64) -> Result<()> {
    target
        .connect()
        .await?
        .follow(pb::FollowRequest {
            master_address: master.clone(),
            epoch,
        })
        .await
        .map_err(status_err)?;
    println!("following {master} in epoch {epoch}");
    Ok(())
}

pub async fn switchover(
    target: &AdminTarget,
    to: String,
    epoch: u64,
    timeout_ms: u64,
) -> Result<()> {
    if epoch == 0 {
        bail!("--epoch must be greater than the current epoch");
    }
    let r = target
        .connect_with_timeout(switchover_call_timeout(timeout_ms))
        .await?
        .switchover(pb::SwitchoverRequest {
            target_broker_id: to.clone(),
            target_admin_address: String::new(),
            new_epoch: epoch,
            timeout_ms,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    println!(
        "{to} is master of epoch {}; writes paused for {} ms",
        r.epoch, r.write_pause_ms
    );
    Ok(())
}

/// Turns a gRPC status into an error that reads well on a terminal.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switchover_waits_for_its_own_timeout_plus_a_margin() {
        // Longer than the 60 s limit of other calls: not cut short.
        assert_eq!(
            switchover_call_timeout(120_000),
            Duration::from_secs(120) + SWITCHOVER_MARGIN
        );
        assert!(switchover_call_timeout(120_000) > CALL_TIMEOUT);
        // The CLI's default, and 0, which the broker reads as 10 s.
        assert_eq!(
            switchover_call_timeout(10_000),
            Duration::from_secs(10) + SWITCHOVER_MARGIN
        );
        assert_eq!(switchover_call_timeout(0), switchover_call_timeout(10_000));
        // The margin covers the promote call to the target (up to 15 s).
        assert!(SWITCHOVER_MARGIN >= Duration::from_secs(15));
    }
}
