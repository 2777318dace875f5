//! The broker's one typed configuration.
//!
//! Values come from, in increasing priority: built-in defaults, a TOML
//! file (`--config`), environment variables (`KEELMQ_*`) and command-line
//! flags. Every setting, its default, its flag and its variable are listed
//! by `keelmq-broker --help` and in the README's configuration reference.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser};
use serde::{Deserialize, Serialize};

use crate::messaging::slave_reads::SlaveReadMode;
use crate::replication::{ReplicationMode, StartRole};
use crate::store::{FlushMode, StoreConfig};

/// Fully resolved broker settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct BrokerConfig {
    /// Directory for the commit log, consume queues and metadata.
    pub data_dir: PathBuf,
    /// Name of the broker group (the route's broker name).
    pub broker_name: String,
    /// Address every listener binds to.
    pub listen_address: String,
    /// Address clients are told to use (defaults to the listen address, or
    /// 127.0.0.1 when that is the wildcard).
    pub advertised_address: Option<String>,
    /// RocketMQ 5 gRPC client port (TLS and plaintext on one port).
    pub client_port: u16,
    /// Admin gRPC port.
    pub admin_port: u16,
    /// HTTP port for /metrics, /healthz and /readyz.
    pub http_port: u16,
    /// Port slaves connect to for the replication stream.
    pub replication_port: u16,
    /// SYNC_FLUSH or ASYNC_FLUSH.
    pub flush_mode: FlushMode,
    /// ASYNC_FLUSH flush interval, in milliseconds.
    pub flush_interval_ms: u64,
    /// How long a SYNC_FLUSH send waits for its flush, in milliseconds.
    pub flush_timeout_ms: u64,
    /// SYNC_FLUSH: write zeros just ahead of the log's end while flushes
    /// are small, so records overwrite written blocks.
    pub zero_ahead: bool,
    /// SYNC_FLUSH: make new commit-log segments of files retention took
    /// from the log, so flushes overwrite written blocks.
    pub reuse_segments: bool,
    /// Commit-log segment size ("1GiB", "64MiB", or bytes).
    pub segment_size: ByteSize,
    /// Entries per consume-queue file.
    pub consume_queue_entries_per_file: u64,
    /// Hours a commit-log segment is kept after its newest record.
    pub retention_hours: u64,
    /// Disk use fraction above which the oldest segments are deleted early.
    pub disk_high_watermark: f64,
    /// Disk use fraction at which writes are refused.
    pub disk_full_ratio: f64,
    /// Optional cap on commit-log bytes ("20GiB"); unset means the disk is the limit.
    pub max_store_size: Option<ByteSize>,
    /// Allow recovery to cut a corrupt commit log at exactly this offset.
    pub allow_truncate_at: Option<u64>,
    /// Log format: "text" or "json".
    pub log_format: LogFormat,
    /// This broker's id within its group (default: the host name).
    pub broker_id: Option<String>,
    /// Role at start: "master" accepts writes at once; "standby" waits to
    /// be told to promote or follow (by the supervisor or the operator).
    pub role: StartRole,
    /// Replication: "sync" acknowledges once `min_in_sync_replicas` slaves
    /// hold a write; "async" once the master does.
    pub replication_mode: ReplicationMode,
    /// Slaves that must hold a write before a SYNC master acknowledges it.
    pub min_in_sync_replicas: u32,
    /// How long a SYNC send waits for its slaves, in milliseconds.
    pub replication_timeout_ms: u64,
    /// Queue count of topics created without one.
    pub default_queue_count: u32,
    /// Create unknown topics on first use (local development only).
    pub auto_create_topics: bool,
    /// PEM certificate chain for TLS on the client port (default: a
    /// certificate the broker makes, with its CA in `<data_dir>/tls/ca.pem`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Age (ms) of an unresolved half message before its first check-back
    /// (RocketMQ `transactionTimeOut`, 6 s); a longer
    /// `orphaned_transaction_recovery_duration` set by the producer wins.
    pub transaction_check_first_ms: u64,
    /// Time (ms) between check-backs (RocketMQ `transactionCheckInterval`, 30 s).
    pub transaction_check_interval_ms: u64,
    /// Check-backs before an unresolved half message is discarded
    /// (RocketMQ `transactionCheckMax`, 15).
    pub transaction_check_max: u32,
    /// Slave reads: "auto" makes a master read records that are far behind
    /// the head of its log from an in-sync slave; "always" reads every
    /// record it can from a slave; "off" never does.
    pub slave_read: SlaveReadMode,
    /// Auto slave reads: "far behind" means more than this fraction of the
    /// memory the broker may use (RocketMQ's `accessMessageInMemoryMaxRatio`, 40 %).
    pub slave_read_memory_ratio: f64,
    /// Auto slave reads: a fixed distance behind the head instead of the
    /// memory fraction ("512MiB").
    pub slave_read_lag_bytes: Option<ByteSize>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("keelmq-data"),
            broker_name: "broker-a".into(),
            listen_address: "0.0.0.0".into(),
            advertised_address: None,
            client_port: 8081,
            admin_port: 8082,
            http_port: 8083,
            replication_port: 10912,
            flush_mode: FlushMode::AsyncFlush,
            flush_interval_ms: 500,
            flush_timeout_ms: 5000,
            zero_ahead: true,
            reuse_segments: true,
            segment_size: ByteSize(1 << 30),
            consume_queue_entries_per_file: 300_000,
            retention_hours: 72,
            disk_high_watermark: 0.85,
            disk_full_ratio: 0.95,
            max_store_size: None,
            allow_truncate_at: None,
            log_format: LogFormat::Text,
            broker_id: None,
            role: StartRole::Master,
            replication_mode: ReplicationMode::Async,
            min_in_sync_replicas: 1,
            replication_timeout_ms: 3000,
            default_queue_count: 8,
            auto_create_topics: false,
            tls_cert: None,
            tls_key: None,
            transaction_check_first_ms: 6_000,
            transaction_check_interval_ms: 30_000,
            transaction_check_max: 15,
            slave_read: SlaveReadMode::Auto,
            slave_read_memory_ratio: 0.4,
            slave_read_lag_bytes: None,
        }
    }
}

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A size in bytes, written as a plain number or with a unit
/// (`KiB`, `MiB`, `GiB`, `TiB`, or `K`, `M`, `G`, `T` meaning the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "String")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Number(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for ByteSize {
    type Error = String;
    fn try_from(v: SizeRepr) -> Result<Self, String> {
        match v {
            SizeRepr::Number(n) => Ok(ByteSize(n)),
            SizeRepr::Text(s) => s.parse(),
        }
    }
}

impl From<ByteSize> for String {
    fn from(b: ByteSize) -> String {
        b.to_string()
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, n) in UNITS {
            if self.0 >= n && self.0.is_multiple_of(n) {
                return write!(f, "{}{name}", self.0 / n);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (try 64MiB or 1GiB)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" | "kb" => 1 << 10,
            "m" | "mib" | "mb" => 1 << 20,
            "g" | "gib" | "gb" => 1 << 30,
            "t" | "tib" | "tb" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB or TiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

/// Command-line flags and environment variables; each overrides the file.
#[derive(Parser, Debug, Clone, Default)]
#[command(
    name = "keelmq-broker",
    version,
    about = "KeelMQ broker: RocketMQ 5 compatible, master/slave replicated",
    after_help = "The log filter comes from KEELMQ_LOG (then RUST_LOG), default info: \
                  comma-separated levels (off, error, warn, info, debug, trace) and \
                  target=level pairs, e.g. info,keelmq_broker::store=debug. A KEELMQ_ \
                  variable no KeelMQ program reads, or a filter with a mistake, stops \
                  the broker at start."
)]
pub struct BrokerArgs {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "KEELMQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: keelmq-data]
    #[arg(long, env = "KEELMQ_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Broker group name [default: broker-a]
    #[arg(long, env = "KEELMQ_BROKER_NAME")]
    pub broker_name: Option<String>,
    /// Address to bind [default: 0.0.0.0]
    #[arg(long, env = "KEELMQ_LISTEN_ADDRESS")]
    pub listen_address: Option<String>,
    /// Address advertised to clients in routes [default: listen address, or 127.0.0.1 for 0.0.0.0]
    #[arg(long, env = "KEELMQ_ADVERTISED_ADDRESS")]
    pub advertised_address: Option<String>,
    /// Client (RocketMQ 5 gRPC) port [default: 8081]
    #[arg(long, env = "KEELMQ_CLIENT_PORT")]
    pub client_port: Option<u16>,
    /// Admin gRPC port [default: 8082]
    #[arg(long, env = "KEELMQ_ADMIN_PORT")]
    pub admin_port: Option<u16>,
    /// HTTP port for metrics and health [default: 8083]
    #[arg(long, env = "KEELMQ_HTTP_PORT")]
    pub http_port: Option<u16>,
    /// Replication port [default: 10912]
    #[arg(long, env = "KEELMQ_REPLICATION_PORT")]
    pub replication_port: Option<u16>,
    /// Flush mode [default: ASYNC_FLUSH]
    #[arg(long, env = "KEELMQ_FLUSH_MODE")]
    pub flush_mode: Option<FlushMode>,
    /// ASYNC_FLUSH interval in ms [default: 500]
    #[arg(long, env = "KEELMQ_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    /// SYNC_FLUSH wait limit in ms [default: 5000]
    #[arg(long, env = "KEELMQ_FLUSH_TIMEOUT_MS")]
    pub flush_timeout_ms: Option<u64>,
    /// SYNC_FLUSH: write zeros just ahead of small flushes [default: true]
    #[arg(long, env = "KEELMQ_ZERO_AHEAD")]
    pub zero_ahead: Option<bool>,
    /// SYNC_FLUSH: make new segments of files retention took [default: true]
    #[arg(long, env = "KEELMQ_REUSE_SEGMENTS")]
    pub reuse_segments: Option<bool>,
    /// Commit-log segment size [default: 1GiB]
    #[arg(long, env = "KEELMQ_SEGMENT_SIZE")]
    pub segment_size: Option<ByteSize>,
    /// Entries per consume-queue file [default: 300000]
    #[arg(long, env = "KEELMQ_CONSUME_QUEUE_ENTRIES_PER_FILE")]
    pub consume_queue_entries_per_file: Option<u64>,
    /// Retention in hours [default: 72]
    #[arg(long, env = "KEELMQ_RETENTION_HOURS")]
    pub retention_hours: Option<u64>,
    /// Disk use fraction that triggers early deletion [default: 0.85]
    #[arg(long, env = "KEELMQ_DISK_HIGH_WATERMARK")]
    pub disk_high_watermark: Option<f64>,
    /// Disk use fraction at which writes are refused [default: 0.95]
    #[arg(long, env = "KEELMQ_DISK_FULL_RATIO")]
    pub disk_full_ratio: Option<f64>,
    /// Cap on commit-log bytes [default: none]
    #[arg(long, env = "KEELMQ_MAX_STORE_SIZE")]
    pub max_store_size: Option<ByteSize>,
    /// Allow recovery to cut a corrupt log at exactly this offset
    #[arg(long, env = "KEELMQ_ALLOW_TRUNCATE_AT")]
    pub allow_truncate_at: Option<u64>,
    /// Log format [default: text]
    #[arg(long, env = "KEELMQ_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Broker id within the group [default: host name]
    #[arg(long, env = "KEELMQ_BROKER_ID")]
    pub broker_id: Option<String>,
    /// Role at start [default: master]
    #[arg(long, env = "KEELMQ_ROLE")]
    pub role: Option<StartRole>,
    /// Replication mode [default: async]
    #[arg(long, env = "KEELMQ_REPLICATION_MODE")]
    pub replication_mode: Option<ReplicationMode>,
    /// Slaves that must confirm a SYNC write [default: 1]
    #[arg(long, env = "KEELMQ_MIN_IN_SYNC_REPLICAS")]
    pub min_in_sync_replicas: Option<u32>,
    /// SYNC replication wait limit in ms [default: 3000]
    #[arg(long, env = "KEELMQ_REPLICATION_TIMEOUT_MS")]
    pub replication_timeout_ms: Option<u64>,
    /// Queue count of topics created without one [default: 8]
    #[arg(long, env = "KEELMQ_DEFAULT_QUEUE_COUNT")]
    pub default_queue_count: Option<u32>,
    /// Create unknown topics on first use [default: false]
    #[arg(long, env = "KEELMQ_AUTO_CREATE_TOPICS")]
    pub auto_create_topics: Option<bool>,
    /// TLS certificate chain (PEM) for the client port [default: generated]
    #[arg(long, env = "KEELMQ_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the client port [default: generated]
    #[arg(long, env = "KEELMQ_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Age in ms of a half message before its first check-back [default: 6000]
    #[arg(long, env = "KEELMQ_TRANSACTION_CHECK_FIRST_MS")]
    pub transaction_check_first_ms: Option<u64>,
    /// Time in ms between transaction check-backs [default: 30000]
    #[arg(long, env = "KEELMQ_TRANSACTION_CHECK_INTERVAL_MS")]
    pub transaction_check_interval_ms: Option<u64>,
    /// Check-backs before an unresolved half message is discarded [default: 15]
    #[arg(long, env = "KEELMQ_TRANSACTION_CHECK_MAX")]
    pub transaction_check_max: Option<u32>,
    /// When a master reads consumers' records from a slave [default: auto]
    #[arg(long, env = "KEELMQ_SLAVE_READ")]
    pub slave_read: Option<SlaveReadMode>,
    /// Auto slave reads: distance behind the head, as a fraction of memory [default: 0.4]
    #[arg(long, env = "KEELMQ_SLAVE_READ_MEMORY_RATIO")]
    pub slave_read_memory_ratio: Option<f64>,
    /// Auto slave reads: distance behind the head in bytes, instead of the ratio [default: none]
    #[arg(long, env = "KEELMQ_SLAVE_READ_LAG_BYTES")]
    pub slave_read_lag_bytes: Option<ByteSize>,
    /// Print the resolved configuration as TOML and exit
    #[arg(long)]
    pub print_config: bool,
}

/// A configuration that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

// --------------------------------------------------------------------------
// `KEELMQ_*` environment variables
//
// clap reads only the variables it knows, so a misspelt one (the flush mode
// without its underscore, say) would leave its setting at the default
// without a word. The broker, the `keelmq` tool and the operator therefore
// refuse, at start, any `KEELMQ_` variable that no KeelMQ program, script,
// test or benchmark reads.

/// The log filter variable (read by [`crate::telemetry`], not by clap).
pub const LOG_FILTER_VARIABLE: &str = "KEELMQ_LOG";

/// `KEELMQ_` variables read by KeelMQ programs other than the broker, and by
/// the project's scripts and tests. Accepted (and ignored) by every program,
/// since one shell or pod may hold variables meant for another program.
pub const OTHER_KEELMQ_VARIABLES: &[&str] = &[
    // keelmq (the command-line tool): the admin endpoint.
    "KEELMQ_ADMIN",
    // keelmq-operator.
    "KEELMQ_WATCH_NAMESPACE",
    "KEELMQ_OPERATOR_POD_LABELS",
    // scripts/chart-check, scripts/test and charts/tests.
    "KEELMQ_OPERATOR_BIN",
    "KEELMQ_CHART_CHECK_WITHOUT_OPERATOR",
    // crds tests: rewrite the committed CRD YAML.
    "KEELMQ_BLESS",
];

/// Prefixes of the variables read by tests and benchmarks
/// (`KEELMQ_TEST_SEED`, `KEELMQ_TEST_LOG`, `KEELMQ_BENCH_SECONDS`,
/// `KEELMQ_E2E_KUBECONFIG`, `KEELMQ_CRASH_DIR`, ...). No program setting may
/// start with one of them.
pub const TOOL_VARIABLE_PREFIXES: &[&str] = &[
    "KEELMQ_TEST_",
    "KEELMQ_BENCH_",
    "KEELMQ_E2E_",
    "KEELMQ_CRASH_",
];

const PREFIX: &str = "KEELMQ_";

/// The `KEELMQ_` variables a clap command (and its subcommands) reads.
pub fn clap_keelmq_variables(cmd: &clap::Command) -> Vec<String> {
    let mut out: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .filter(|e| e.starts_with(PREFIX))
        .collect();
    for sub in cmd.get_subcommands() {
        out.extend(clap_keelmq_variables(sub));
    }
    out.sort();
    out.dedup();
    out
}

/// Every `KEELMQ_` variable the broker reads: its settings and the log filter.
pub fn broker_variables() -> Vec<String> {
    let mut v = clap_keelmq_variables(&BrokerArgs::command());
    v.push(LOG_FILTER_VARIABLE.to_owned());
    v
}

/// Refuses the `KEELMQ_` variables among `names` (the names of the
/// environment, e.g. `std::env::vars_os().map(|(k, _)| k)`) that neither
/// `program` (whose own variables are `own`) nor any other KeelMQ program,
/// script, test or benchmark reads. The prefix is matched without regard to
/// case, since a lower-case name is as ignored as a misspelt one. The error names
/// each one and, where one is close, the variable probably meant.
pub fn check_keelmq_variables<I, K>(
    program: &str,
    own: &[String],
    names: I,
) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = K>,
    K: AsRef<OsStr>,
{
    let broker = broker_variables();
    let known = |name: &str| {
        own.iter().any(|o| o == name)
            || broker.iter().any(|b| b == name)
            || OTHER_KEELMQ_VARIABLES.contains(&name)
            || TOOL_VARIABLE_PREFIXES.iter().any(|p| name.starts_with(p))
    };
    let names: Vec<String> = names
        .into_iter()
        .map(|n| n.as_ref().to_string_lossy().into_owned())
        .collect();
    let mut unknown: Vec<String> = names
        .iter()
        .filter(|n| {
            n.get(..PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
                && !known(n)
                && !is_service_link(n, &names)
        })
        .cloned()
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    // Suggestions: the program's own variables first, then the others.
    let mut candidates: Vec<&str> = own.iter().map(String::as_str).collect();
    candidates.extend(broker.iter().map(String::as_str));
    candidates.extend(OTHER_KEELMQ_VARIABLES.iter().copied());
    let described: Vec<String> = unknown
        .iter()
        .map(|name| match closest_variable(name, &candidates) {
            Some(s) if s.eq_ignore_ascii_case(name) => {
                format!("{name} (did you mean {s}? variable names are case-sensitive)")
            }
            Some(s) => format!("{name} (did you mean {s}?)"),
            None => name.clone(),
        })
        .collect();
    let (noun, pronoun, setting) = if unknown.len() == 1 {
        ("variable", "it", "its setting")
    } else {
        ("variables", "them", "their settings")
    };
    Err(ConfigError(format!(
        "unknown environment {noun} {}: no KeelMQ program reads {pronoun}, so {setting} would \
         be silently ignored; rename or unset {pronoun} (`{program} --help` lists the \
         variables {program} reads)",
        described.join(", ")
    )))
}

/// Whether `name` is one of the variables Kubernetes puts in every pod for
/// each Service of its namespace (unless the pod turns service links off):
/// with `<S>` the Service's name in capitals and `_` for `-`,
/// `<S>_SERVICE_HOST`, `<S>_SERVICE_PORT[_<port name>]`, `<S>_PORT` and
/// `<S>_PORT_<port>_<protocol>[_PROTO|_PORT|_ADDR]`. A Service
/// whose name starts with `keelmq` (a BrokerGroup named so, the chart's
/// metrics Service) would otherwise stop every KeelMQ program in the
/// namespace. The bare `<S>_PORT` counts only next to its `<S>_SERVICE_HOST`,
/// which Kubernetes always sets with it.
fn is_service_link(name: &str, all: &[String]) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.ends_with("_SERVICE_PORT") {
        return true;
    }
    let has_host = |service: &str| {
        all.iter()
            .any(|n| n.strip_suffix("_SERVICE_HOST") == Some(service))
    };
    if let Some((service, _)) = name.split_once("_SERVICE_PORT_") {
        return has_host(service);
    }
    if name.strip_suffix("_PORT").is_some_and(has_host) {
        return true;
    }
    // <S>_PORT_<number>_<PROTOCOL>, optionally _PROTO, _PORT or _ADDR.
    let Some((_, tail)) = name.rsplit_once("_PORT_").filter(|(_, t)| !t.is_empty()) else {
        return false;
    };
    let (port, rest) = tail.split_once('_').unwrap_or((tail, ""));
    let (protocol, field) = rest.split_once('_').unwrap_or((rest, ""));
    !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && matches!(protocol, "TCP" | "UDP" | "SCTP")
        && matches!(field, "" | "PROTO" | "PORT" | "ADDR")
}

/// The candidate closest to `name` (ignoring case), if it is close enough
/// to be a likely typo: at most a fifth of the part after `KEELMQ_` (and at
/// least 2) edits away, the first of equally close candidates winning; else
/// the longest candidate that `name` extends or shortens by whole words
/// (a `_FILE` too many, a `_BYTES` too few).
fn closest_variable<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let upper = name.to_ascii_uppercase();
    let suffix_len = upper.len().saturating_sub(PREFIX.len());
    let limit = (suffix_len / 5).max(2);
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        let d = edit_distance(&upper, c);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    let extends = |long: &str, short: &str| {
        long.strip_prefix(short)
            .is_some_and(|rest| rest.starts_with('_'))
    };
    best.map(|(_, c)| c).or_else(|| {
        candidates
            .iter()
            .copied()
            .filter(|c| extends(&upper, c) || extends(c, &upper))
            .max_by_key(|c| c.len())
    })
}

/// Levenshtein distance between two strings, by characters (strsim's, which clap already uses).
pub fn edit_distance(a: &str, b: &str) -> usize {
    strsim::levenshtein(a, b)
}

impl BrokerArgs {
    /// What the broker does at start: refuses unknown `KEELMQ_` variables
    /// among `env_names` (the names of its environment), then resolves.
    pub fn resolve_at_start<I, K>(&self, env_names: I) -> Result<BrokerConfig, ConfigError>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<OsStr>,
    {
        check_keelmq_variables("keelmq-broker", &broker_variables(), env_names)?;
        self.resolve()
    }

    /// Resolves file, environment and flags into one configuration.
    pub fn resolve(&self) -> Result<BrokerConfig, ConfigError> {
        let mut c = match &self.config {
            Some(path) => load_file(path)?,
            None => BrokerConfig::default(),
        };
        macro_rules! over {
            ($($field:ident),*) => { $( if let Some(v) = self.$field.clone() { c.$field = v; } )* };
        }
        over!(
            data_dir,
            broker_name,
            listen_address,
            client_port,
            admin_port,
            http_port,
            replication_port,
            flush_mode,
            flush_interval_ms,
            flush_timeout_ms,
            zero_ahead,
            reuse_segments,
            segment_size,
            consume_queue_entries_per_file,
            retention_hours,
            disk_high_watermark,
            disk_full_ratio,
            log_format,
            role,
            replication_mode,
            min_in_sync_replicas,
            replication_timeout_ms,
            default_queue_count,
            auto_create_topics,
            transaction_check_first_ms,
            transaction_check_interval_ms,
            transaction_check_max,
            slave_read,
            slave_read_memory_ratio
        );
        for (value, slot) in [
            (&self.broker_id, &mut c.broker_id),
            (&self.advertised_address, &mut c.advertised_address),
        ] {
            if value.is_some() {
                slot.clone_from(value);
            }
        }
        for (value, slot) in [
            (&self.tls_cert, &mut c.tls_cert),
            (&self.tls_key, &mut c.tls_key),
        ] {
            if value.is_some() {
                slot.clone_from(value);
            }
        }
        if self.max_store_size.is_some() {
            c.max_store_size = self.max_store_size;
        }
        if self.allow_truncate_at.is_some() {
            c.allow_truncate_at = self.allow_truncate_at;
        }
        if self.slave_read_lag_bytes.is_some() {
            c.slave_read_lag_bytes = self.slave_read_lag_bytes;
        }
        c.validate()?;
        Ok(c)
    }
}

fn load_file(path: &Path) -> Result<BrokerConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "reading configuration file {}: {e}",
            path.display()
        ))
    })?;
    toml::from_str(&text)
        .map_err(|e| ConfigError(format!("configuration file {}: {e}", path.display())))
}

impl BrokerConfig {
    /// Checks what the store and listeners would otherwise reject later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store_config()
            .validate()
            .map_err(|e| ConfigError(e.to_string()))?;
        if self.disk_high_watermark > self.disk_full_ratio {
            return Err(ConfigError(format!(
                "disk_high_watermark {} is above disk_full_ratio {}: writes would be refused \
                 before early deletion starts freeing space",
                self.disk_high_watermark, self.disk_full_ratio
            )));
        }
        if self.replication_mode == ReplicationMode::Sync && self.min_in_sync_replicas == 0 {
            return Err(ConfigError(
                "replication_mode sync needs min_in_sync_replicas of at least 1: with 0 a send \
                 is acknowledged before any slave holds it (as with async), and no failover \
                 could ever be sure to lose nothing; use replication_mode async instead"
                    .into(),
            ));
        }
        if self.default_queue_count == 0 || self.default_queue_count > crate::store::MAX_QUEUES {
            return Err(ConfigError(format!(
                "default_queue_count {} out of range (1 to {})",
                self.default_queue_count,
                crate::store::MAX_QUEUES
            )));
        }
        if !(self.slave_read_memory_ratio > 0.0 && self.slave_read_memory_ratio <= 1.0) {
            return Err(ConfigError(format!(
                "slave_read_memory_ratio {} must be in (0, 1]",
                self.slave_read_memory_ratio
            )));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError(
                "tls_cert and tls_key must be given together".into(),
            ));
        }
        if self.transaction_check_interval_ms == 0 {
            return Err(ConfigError(
                "transaction_check_interval_ms must be at least 1".into(),
            ));
        }
        if self.broker_name.is_empty() {
            return Err(ConfigError("broker_name must not be empty".into()));
        }
        let ports = [
            self.client_port,
            self.admin_port,
            self.http_port,
            self.replication_port,
        ];
        for (i, a) in ports.iter().enumerate() {
            if ports[i + 1..].contains(a) && *a != 0 {
                return Err(ConfigError(format!("port {a} is configured twice")));
            }
        }
        Ok(())
    }

    /// The storage part of the configuration.
    pub fn store_config(&self) -> StoreConfig {
        let mut s = StoreConfig::new(&self.data_dir);
        s.segment_size = self.segment_size.0;
        s.flush_mode = self.flush_mode;
        s.flush_interval = Duration::from_millis(self.flush_interval_ms);
        s.flush_timeout = Duration::from_millis(self.flush_timeout_ms);
        s.zero_ahead = self.zero_ahead;
        s.reuse_segments = self.reuse_segments;
        s.cq_entries_per_file = self.consume_queue_entries_per_file;
        s.retention = Duration::from_secs(self.retention_hours * 3600);
        s.disk_high_watermark = self.disk_high_watermark;
        s.disk_full_ratio = self.disk_full_ratio;
        s.max_store_bytes = self.max_store_size.map(|b| b.0);
        s.allow_truncate_at = self.allow_truncate_at;
        s
    }

    /// Transaction check-back timing.
    /// Auto slave reads: how far behind the head of the log (bytes) a
    /// record must be for the master to read it from a slave.
    pub fn slave_read_threshold(&self) -> u64 {
        match self.slave_read_lag_bytes {
            Some(b) => b.0,
            None => {
                (crate::messaging::slave_reads::memory_limit_bytes() as f64
                    * self.slave_read_memory_ratio) as u64
            }
        }
    }

    pub fn transaction_config(&self) -> crate::messaging::transaction::TransactionConfig {
        crate::messaging::transaction::TransactionConfig {
            first_check: Duration::from_millis(self.transaction_check_first_ms),
            check_interval: Duration::from_millis(self.transaction_check_interval_ms),
            max_checks: self.transaction_check_max,
        }
    }

    /// This broker's id: configured, else the host name.
    pub fn broker_id(&self) -> String {
        self.broker_id.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|h| h.trim().to_owned())
                })
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "broker-0".into())
        })
    }

    /// Settings that are valid but probably not what was meant, worded for
    /// the log at start.
    ///
    /// A SYNC master with no slaves (every send would time out) is not
    /// reported: slaves are attached at run time by `follow` calls, so the
    /// configuration does not say whether any will come.
    pub fn startup_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let advertised = self.advertised_host();
        if is_loopback_host(&advertised) && !is_loopback_host(&self.listen_address) {
            warnings.push(format!(
                "the broker listens on {} but advertises {advertised}, a loopback address: \
                 clients on other machines are routed to their own loopback. Set \
                 advertised_address (KEELMQ_ADVERTISED_ADDRESS) to an address they can reach",
                self.listen_address
            ));
        }
        warnings
    }

    /// The address clients should dial.
    pub fn advertised_host(&self) -> String {
        match &self.advertised_address {
            Some(a) => a.clone(),
            None if self.listen_address == "0.0.0.0" || self.listen_address == "::" => {
                "127.0.0.1".into()
            }
            None => self.listen_address.clone(),
        }
    }
}

/// `localhost` or a loopback IP address (`127.0.0.0/8`, `::1`; brackets allowed).
fn is_loopback_host(host: &str) -> bool {
    let h = host.trim();
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("64MiB".parse::<ByteSize>(), Ok(ByteSize(64 << 20)));
        assert_eq!("1g".parse::<ByteSize>(), Ok(ByteSize(1 << 30)));
        assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
    }

    #[test]
    fn file_then_env_and_flags_override() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            "flush_mode = \"SYNC_FLUSH\"\nsegment_size = \"64MiB\"\nclient_port = 9000\n",
        )
        .expect("write");
        let args = BrokerArgs::parse_from([
            "keelmq-broker",
            "--config",
            path.to_str().expect("utf8"),
            "--client-port",
            "9100",
        ]);
        let c = args.resolve().expect("resolves");
        assert_eq!(c.flush_mode, FlushMode::SyncFlush);
        assert_eq!(c.segment_size, ByteSize(64 << 20));
        assert_eq!(c.client_port, 9100, "flags beat the file");
        assert_eq!(c.admin_port, 8082, "defaults fill the rest");
        let args = BrokerArgs::parse_from([
            "keelmq-broker",
            "--role",
            "standby",
            "--replication-mode",
            "sync",
            "--min-in-sync-replicas",
            "2",
            "--auto-create-topics",
            "true",
            "--broker-id",
            "b7",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
        ]);
        let c = args.resolve().expect("resolves");
        assert_eq!(c.role, StartRole::Standby);
        assert_eq!(c.replication_mode, ReplicationMode::Sync);
        assert_eq!(c.min_in_sync_replicas, 2);
        assert!(c.auto_create_topics);
        assert_eq!(c.broker_id(), "b7");
        assert_eq!(c.tls_key.as_deref(), Some(Path::new("/k.pem")));
        let half = BrokerArgs::parse_from(["keelmq-broker", "--tls-cert", "/c.pem"]);
        assert!(
            half.resolve().is_err(),
            "a certificate without its key is refused"
        );
    }

    #[test]
    fn bad_configuration_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "flush_mod = \"SYNC_FLUSH\"\n").expect("write");
        let args =
            BrokerArgs::parse_from(["keelmq-broker", "--config", path.to_str().expect("utf8")]);
        let err = args.resolve().expect_err("typo is refused");
        assert!(err.to_string().contains("flush_mod"), "{err}");
        let refused = |flags: &[&str]| {
            let args = BrokerArgs::parse_from(
                std::iter::once("keelmq-broker").chain(flags.iter().copied()),
            );
            args.resolve().expect_err("refused").to_string()
        };
        refused(&["--segment-size", "1000"]);
        assert!(refused(&["--flush-timeout-ms", "0"]).contains("flush timeout"));
        assert!(refused(&["--admin-port", "8081"]).contains("twice"));
    }

    #[test]
    fn sync_replication_with_no_in_sync_slave_is_refused() {
        let resolve = |flags: &[&str]| {
            BrokerArgs::parse_from(std::iter::once("keelmq-broker").chain(flags.iter().copied()))
                .resolve()
        };
        let err = resolve(&["--replication-mode", "sync", "--min-in-sync-replicas", "0"])
            .expect_err("sync with 0 acknowledges like async");
        assert!(
            err.to_string()
                .contains("min_in_sync_replicas of at least 1"),
            "{err}"
        );
        resolve(&["--replication-mode", "async", "--min-in-sync-replicas", "0"])
            .expect("async ignores the count");
        resolve(&["--replication-mode", "sync"]).expect("the default count is 1");
    }

    #[test]
    fn disk_high_watermark_above_full_ratio_is_refused() {
        let resolve = |flags: &[&str]| {
            BrokerArgs::parse_from(std::iter::once("keelmq-broker").chain(flags.iter().copied()))
                .resolve()
        };
        let err = resolve(&["--disk-high-watermark", "0.97", "--disk-full-ratio", "0.95"])
            .expect_err("early deletion would never start");
        let msg = err.to_string();
        assert!(
            msg.contains("disk_high_watermark 0.97") && msg.contains("disk_full_ratio 0.95"),
            "{msg}"
        );
        // The same from a file.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "disk_full_ratio = 0.8\n").expect("write");
        let err = resolve(&["--config", path.to_str().expect("utf8")])
            .expect_err("0.85 default watermark above 0.8");
        assert!(err.to_string().contains("disk_high_watermark"), "{err}");
        resolve(&["--disk-high-watermark", "0.9", "--disk-full-ratio", "0.9"])
            .expect("equal is allowed");
        resolve(&["--disk-high-watermark", "0.5", "--disk-full-ratio", "0.99"]).expect("valid");
    }

    #[test]
    fn loopback_advertised_with_a_wider_listen_address_warns() {
        let warnings = |listen: &str, advertised: Option<&str>| {
            BrokerConfig {
                listen_address: listen.into(),
                advertised_address: advertised.map(Into::into),
                ..BrokerConfig::default()
            }
            .startup_warnings()
        };
        // The default: listen on every address, advertise 127.0.0.1.
        let w = BrokerConfig::default().startup_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("0.0.0.0") && w[0].contains("127.0.0.1"),
            "{w:?}"
        );
        assert!(w[0].contains("KEELMQ_ADVERTISED_ADDRESS"), "{w:?}");
        assert_eq!(warnings("::", None).len(), 1);
        assert_eq!(warnings("0.0.0.0", Some("localhost")).len(), 1);
        assert_eq!(warnings("10.1.2.3", Some("[::1]")).len(), 1);
        // Loopback only, or an advertised address others can reach: fine.
        assert!(warnings("127.0.0.1", None).is_empty());
        assert!(warnings("::1", Some("localhost")).is_empty());
        assert!(warnings("0.0.0.0", Some("broker-0.example")).is_empty());
        assert!(warnings("0.0.0.0", Some("10.1.2.3")).is_empty());
        assert!(warnings("10.1.2.3", None).is_empty());
    }

    /// A variable name built at run time, so that the repository scan in
    /// `every_keelmq_variable_in_the_repository_is_known` does not find
    /// this module's deliberate typos.
    fn var(suffix: &str) -> String {
        format!("KEELMQ_{suffix}")
    }

    #[test]
    fn kubernetes_service_link_variables_are_not_taken_for_typos() {
        // What a pod gets for Services `keelmq` (a BrokerGroup so named) and
        // `keelmq-metrics` (the chart's, for release `keelmq`).
        let mut env: Vec<String> = Vec::new();
        for s in ["", "_METRICS"] {
            for v in [
                "_SERVICE_HOST",
                "_SERVICE_PORT",
                "_SERVICE_PORT_HTTP_METRICS",
                "_PORT",
                "_PORT_8080_TCP",
                "_PORT_8080_TCP_PROTO",
                "_PORT_8080_TCP_PORT",
                "_PORT_8080_TCP_ADDR",
                "_PORT_53_UDP",
            ] {
                env.push(
                    var(&format!("{}{v}", s.trim_start_matches('_')))
                        .replace("KEELMQ__", "KEELMQ_"),
                );
            }
        }
        env.push("KEELMQ_FLUSH_MODE".into());
        assert!(
            check_keelmq_variables("keelmq-broker", &broker_variables(), &env).is_ok(),
            "{env:?}"
        );
        // Without its Service's host variable a bare `_PORT` name is not a
        // service link, and near-misses of the patterns are still refused.
        for bad in [
            "ADMN_PORT",
            "PORT_80_HTTP",
            "PORT_X_TCP",
            "X_PORT_80_TCP_HOST",
        ] {
            let names = ["PATH".to_owned(), var(bad)];
            assert!(
                check_keelmq_variables("keelmq-broker", &broker_variables(), &names).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_misspelt_setting_variable_is_refused_with_the_likely_name() {
        // The broker's start-up path: `KEELMQ_FLUSHMODE=SYNC_FLUSH` used to
        // leave ASYNC_FLUSH in force without a word.
        let args = BrokerArgs::parse_from(["keelmq-broker"]);
        let err = args
            .resolve_at_start(["PATH".to_owned(), var("FLUSHMODE"), "HOME".to_owned()])
            .expect_err("an unknown KEELMQ_ variable stops the broker");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "unknown environment variable {}",
                var("FLUSHMODE")
            )) && msg.contains("did you mean KEELMQ_FLUSH_MODE?")
                && msg.contains("keelmq-broker --help"),
            "{msg}"
        );
        args.resolve_at_start(["PATH", "KEELMQ_FLUSH_MODE"])
            .expect("the right name is accepted");

        let check = |names: &[String]| {
            check_keelmq_variables("keelmq-broker", &broker_variables(), names)
                .map_err(|e| e.to_string())
        };
        for (typo, meant) in [
            ("DATADIR", "KEELMQ_DATA_DIR"),
            ("SEGMENT_SIZ", "KEELMQ_SEGMENT_SIZE"),
            ("REPLICATON_MODE", "KEELMQ_REPLICATION_MODE"),
            (
                "TRANSACTION_CHECK_INTERVAL",
                "KEELMQ_TRANSACTION_CHECK_INTERVAL_MS",
            ),
            ("LGO", "KEELMQ_LOG"),
            ("CONFIG_FILE", "KEELMQ_CONFIG"),
            ("SLAVE_READ_LAG", "KEELMQ_SLAVE_READ_LAG_BYTES"),
            ("TLS", "KEELMQ_TLS_CERT"),
        ] {
            let msg = check(&[var(typo)]).expect_err(typo);
            assert!(msg.contains(&format!("did you mean {meant}?")), "{msg}");
        }
        // Names are case-sensitive: a lower-case one is not read either.
        let msg = check(&["keelmq_flush_mode".to_owned()]).expect_err("lower case");
        assert!(
            msg.contains("keelmq_flush_mode (did you mean KEELMQ_FLUSH_MODE? variable names are case-sensitive)"),
            "{msg}"
        );
        // Nothing close: named, with no suggestion.
        let msg = check(&[var("COLOUR_SCHEME")]).expect_err("unknown");
        assert!(
            msg.contains(&var("COLOUR_SCHEME")) && !msg.contains("did you mean"),
            "{msg}"
        );
        // Several: all of them, in one message.
        let msg = check(&[var("ROLL"), var("ZERO_AHEAD_"), "KEELMQ_ROLE".into()])
            .expect_err("two unknown");
        assert!(
            msg.starts_with("unknown environment variables ")
                && msg.contains(&format!("{} (did you mean KEELMQ_ROLE?)", var("ROLL")))
                && msg.contains(&format!(
                    "{} (did you mean KEELMQ_ZERO_AHEAD?)",
                    var("ZERO_AHEAD_")
                )),
            "{msg}"
        );
    }

    #[test]
    fn variables_of_other_programs_scripts_and_tests_are_accepted() {
        let mut names = broker_variables();
        names.extend(OTHER_KEELMQ_VARIABLES.iter().map(|v| v.to_string()));
        names.extend(
            [
                "KEELMQ_TEST_SEED",
                "KEELMQ_TEST_LOG",
                "KEELMQ_BENCH_SECONDS",
                "KEELMQ_BENCH_ONLY",
                "KEELMQ_E2E_KUBECONFIG",
                "KEELMQ_CRASH_DIR",
                "RUST_LOG",
                "PATH",
                "KEELMQ",
                "MY_KEELMQ_THING",
            ]
            .map(String::from),
        );
        check_keelmq_variables("keelmq-broker", &broker_variables(), &names)
            .expect("every one is read by some KeelMQ program, script or test");
        // `--help` names the one variable clap does not list.
        let help = BrokerArgs::command().render_long_help().to_string();
        assert!(help.contains("KEELMQ_LOG"), "{help}");
        // The list is clap's: every setting, and the log filter.
        let vars = broker_variables();
        for v in [
            "KEELMQ_CONFIG",
            "KEELMQ_FLUSH_MODE",
            "KEELMQ_SLAVE_READ_LAG_BYTES",
            "KEELMQ_LOG",
        ] {
            assert!(vars.iter().any(|x| x == v), "{v} missing from {vars:?}");
        }
        // A setting under a tool prefix would let its typos through.
        for v in &vars {
            assert!(
                !TOOL_VARIABLE_PREFIXES.iter().any(|p| v.starts_with(p)),
                "{v} starts with a prefix reserved for tests and benchmarks"
            );
        }
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("FLUSHMODE", "FLUSH_MODE"), 1);
        assert_eq!(edit_distance("ROLE", "ROEL"), 2);
        assert_eq!(edit_distance("KITTEN", "SITTING"), 3);
        assert_eq!(edit_distance("ABC", ""), 3);
    }

    /// Every `KEELMQ_` name the repository's code, scripts, chart, Dockerfiles
    /// and documentation use is one some KeelMQ program, script or test
    /// reads, so that nothing the project itself sets or documents is
    /// refused at start. Test modules (from the first `#[cfg(test)]` of a
    /// source file) and the chart checks' sample values files are left out:
    /// they hold deliberate unknowns.
    #[test]
    fn every_keelmq_variable_in_the_repository_is_known() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let mut files = Vec::new();
        for dir in [
            "broker", "operator", "failover", "crds", "proto", "tests", "docker", "scripts",
            "charts",
        ] {
            collect_files(&root.join(dir), &mut files);
        }
        files.push(root.join("README.md"));
        let mut known = broker_variables();
        known.extend(OTHER_KEELMQ_VARIABLES.iter().map(|v| v.to_string()));
        let mut unknown = Vec::new();
        let mut seen = 0;
        for path in files {
            let rel = path.strip_prefix(&root).unwrap_or(&path).to_path_buf();
            if rel.starts_with("charts/tests/values") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue; // binary
            };
            let text: &str = if rel.extension().is_some_and(|e| e == "rs") {
                text.split("#[cfg(test)]").next().unwrap_or_default()
            } else {
                &text
            };
            for name in keelmq_names(text) {
                seen += 1;
                // A prefix of a known name (`starts_with("KEELMQ_TLS")`)
                // sets nothing.
                let a_prefix = known.iter().any(|k| k.starts_with(&name));
                if !a_prefix
                    && check_keelmq_variables("keelmq-broker", &broker_variables(), [&name])
                        .is_err()
                {
                    unknown.push(format!("{}: {name}", rel.display()));
                }
            }
        }
        assert!(seen > 50, "the scan found only {seen} names");
        assert!(unknown.is_empty(), "unknown KEELMQ_ variables: {unknown:?}");
    }

    fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name();
            if name == "target" || name.to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                collect_files(&path, out);
            } else {
                out.push(path);
            }
        }
    }

    /// Every word `KEELMQ_[A-Z0-9_]+` in `text` (not inside a longer
    /// identifier such as `OTHER_KEELMQ_VARIABLES`).
    fn keelmq_names(text: &str) -> Vec<String> {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let mut out = Vec::new();
        let mut from = 0;
        while let Some(i) = text[from..].find("KEELMQ_").map(|i| i + from) {
            let tail = &text[i..];
            let end = tail.find(|c: char| !word(c)).unwrap_or(tail.len());
            let inside_a_word = text[..i].chars().next_back().is_some_and(word);
            if !inside_a_word && end > "KEELMQ_".len() {
                out.push(tail[..end].to_owned());
            }
            from = i + end;
        }
        out
    }

    #[test]
    fn zeros_ahead_can_be_turned_off() {
        assert!(BrokerConfig::default().store_config().zero_ahead);
        let args = BrokerArgs::parse_from(["keelmq-broker", "--zero-ahead", "false"]);
        let c = args.resolve().expect("valid");
        assert!(!c.zero_ahead && !c.store_config().zero_ahead);
    }
}
