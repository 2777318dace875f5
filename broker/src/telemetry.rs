//! Logging set-up shared by the binaries.
//!
//! The filter uses `tracing-subscriber`'s directive syntax: comma-separated
//! levels (`info`) and `target=level` pairs (`info,keelmq_broker::store=debug`).
//! In that syntax a bare word that is not a level is a *target*: `debgu`
//! means "everything from the target `debgu`, nothing else", which silences
//! the process. [`LogFilter::parse`] therefore refuses a bare word that is
//! neither a level, nor a module path (with `::`), nor a known crate.

use std::ffi::OsString;
use std::str::FromStr;

use tracing::Dispatch;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{Directive, LevelFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// The level names a filter accepts (case-insensitive; tracing also reads
/// the numbers 0 to 5).
pub const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The filter when no variable sets one.
pub const DEFAULT_FILTER: &str = "info";

/// Crates whose name alone is accepted as a target (every event of that
/// crate, at every level): the workspace's own, and the dependencies that
/// log through `tracing` or `log`. Anything with `::` is accepted as a
/// module path.
pub const KNOWN_TARGETS: &[&str] = &[
    "keelmq",
    "keelmq_broker",
    "keelmq_operator",
    "keelmq_failover",
    "keelmq_crds",
    "keelmq_proto",
    "keelmq_tests",
    "axum",
    "h2",
    "hyper",
    "hyper_rustls",
    "hyper_util",
    "jiff",
    "kube",
    "kube_client",
    "kube_runtime",
    "rustls",
    "tokio",
    "tokio_rustls",
    "tokio_tungstenite",
    "tonic",
    "tower",
    "tower_http",
    "tungstenite",
];

/// A checked log filter and where it came from.
#[derive(Debug)]
pub struct LogFilter {
    /// The directives, with blanks around each removed.
    pub spec: String,
    /// The variable it was read from, or "default".
    pub source: &'static str,
    filter: EnvFilter,
}

impl LogFilter {
    /// The filter of the first of `variables` that is set and not blank
    /// (`get` reads a variable), or [`DEFAULT_FILTER`]. A filter with a
    /// mistake is an error, not a fall-back.
    pub fn from_vars(
        variables: &[&'static str],
        get: impl Fn(&str) -> Option<OsString>,
    ) -> Result<LogFilter, String> {
        for &name in variables {
            let Some(value) = get(name) else { continue };
            let value = value
                .into_string()
                .map_err(|v| format!("{name}={v:?} is not valid UTF-8"))?;
            if value.trim().is_empty() {
                continue;
            }
            return LogFilter::parse(&value, name).map_err(|e| format!("{name}: {e}"));
        }
        LogFilter::parse(DEFAULT_FILTER, "default")
    }

    /// The broker's and the `keelmq` tool's filter: `KEELMQ_LOG`, then
    /// `RUST_LOG`, default `info`.
    pub fn from_env() -> Result<LogFilter, String> {
        Self::from_vars(&[crate::config::LOG_FILTER_VARIABLE, "RUST_LOG"], |n| {
            std::env::var_os(n)
        })
    }

    /// Checks a filter (see the module documentation).
    pub fn parse(spec: &str, source: &'static str) -> Result<LogFilter, String> {
        let directives: Vec<&str> = spec
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect();
        if directives.is_empty() {
            return Err(format!("the log filter {spec:?} has no directives"));
        }
        for d in &directives {
            check_directive(d).map_err(|e| format!("log filter {spec:?}: {e}"))?;
        }
        let spec = directives.join(",");
        let filter = EnvFilter::try_new(&spec).map_err(|e| format!("log filter {spec:?}: {e}"))?;
        Ok(LogFilter {
            spec,
            source,
            filter,
        })
    }

    /// The `tracing-subscriber` filter.
    pub fn into_env_filter(self) -> EnvFilter {
        self.filter
    }
}

fn check_directive(d: &str) -> Result<(), String> {
    Directive::from_str(d).map_err(|e| format!("{d:?} is not a valid directive: {e}"))?;
    if d.contains(['=', '[']) || LevelFilter::from_str(d).is_ok() {
        return Ok(());
    }
    // A bare target.
    if d.contains("::") || KNOWN_TARGETS.contains(&d) {
        return Ok(());
    }
    let levels = LEVELS.join(", ");
    let hint = closest(d, &LEVELS)
        .or_else(|| closest(d, KNOWN_TARGETS))
        .map(|s| format!(" Did you mean {s:?}?"))
        .unwrap_or_default();
    Err(format!(
        "{d:?} is not a level ({levels}) nor a known target: tracing would read it as the \
         name of a target, and a filter of target names alone disables every other log \
         line.{hint} Write a target with its level (`<target>=debug`) or as a module path \
         (with `::`)"
    ))
}

/// The candidate at most 2 edits from `word` (ignoring case), the closest first.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (crate::config::edit_distance(&lower, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Installs the global `tracing` subscriber with `filter` and logs the
/// filter in force.
pub fn install(format: LogFormat, filter: LogFilter) {
    let (spec, source) = (filter.spec.clone(), filter.source);
    let _ = subscriber(format, filter.into_env_filter(), std::io::stderr).try_init();
    announce(&spec, source);
}

/// The subscriber [`install`] sets: `format` lines through `filter` to `writer`.
pub fn subscriber<W>(format: LogFormat, filter: EnvFilter, writer: W) -> Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => Dispatch::new(builder.json().finish()),
        LogFormat::Text => Dispatch::new(builder.finish()),
    }
}

/// The start-up line naming the filter in force and where it came from.
fn announce(spec: &str, source: &str) {
    tracing::info!(filter = %spec, from = source, "log filter in force");
}

/// Installs the global `tracing` subscriber. The filter comes from
/// `KEELMQ_LOG` (then `RUST_LOG`), default `info`; a filter with a mistake
/// is an error.
pub fn init(format: LogFormat) -> Result<(), String> {
    install(format, LogFilter::from_env()?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<String, String> {
        LogFilter::parse(spec, "test").map(|f| f.spec)
    }

    #[test]
    fn a_misspelt_level_is_refused_not_read_as_a_target() {
        for spec in ["debgu", "warn,debgu", "infoo", "Trcae"] {
            let err = parse(spec).expect_err(spec);
            assert!(
                err.contains("is not a level (off, error, warn, info, debug, trace)")
                    && err.contains("disables every other log line"),
                "{err}"
            );
        }
        assert!(
            parse("debgu")
                .unwrap_err()
                .contains("Did you mean \"debug\"?")
        );
        assert!(
            parse("keelmq_brokr")
                .unwrap_err()
                .contains("Did you mean \"keelmq_broker\"?")
        );
        // Nothing close: no suggestion, still refused.
        let err = parse("verbose").expect_err("not a level");
        assert!(!err.contains("Did you mean"), "{err}");
        // Broken syntax and bad levels after `=` are refused, not dropped.
        assert!(parse("keelmq_broker=debgu").is_err());
        assert!(parse("=debug").is_err());
        assert!(parse(" , ").is_err());
    }

    #[test]
    fn levels_targets_and_module_paths_are_accepted() {
        for spec in [
            "info",
            "DEBUG",
            "off",
            "3",
            "info,keelmq_broker=debug",
            "warn,keelmq_broker::store=trace,h2=info",
            "keelmq_broker::store",
            "tonic",
            "info,[request]=debug",
        ] {
            parse(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        }
        // Blanks around directives would make tracing read " debug" as a
        // target; they are removed.
        assert_eq!(
            parse(" info , keelmq_broker=debug ").as_deref(),
            Ok("info,keelmq_broker=debug")
        );
    }

    use crate::testing::Captured;

    #[test]
    fn the_filter_in_force_is_logged_at_start() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let out = Captured::default();
            let f = LogFilter::parse("info,h2=warn", "KEELMQ_LOG").expect("valid");
            let (spec, source) = (f.spec.clone(), f.source);
            let w = out.clone();
            let d = subscriber(format, f.into_env_filter(), move || w.clone());
            tracing::dispatcher::with_default(&d, || announce(&spec, source));
            let text = out.text();
            assert!(
                text.contains("log filter in force")
                    && text.contains("info,h2=warn")
                    && text.contains("KEELMQ_LOG"),
                "{text}"
            );
        }
    }

    #[test]
    fn the_first_variable_set_wins_and_a_bad_one_is_an_error() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let names = &["KEELMQ_LOG", "RUST_LOG"];
        let f = LogFilter::from_vars(names, vars(&[])).expect("default");
        assert_eq!((f.spec.as_str(), f.source), ("info", "default"));
        let f = LogFilter::from_vars(names, vars(&[("RUST_LOG", "debug")])).expect("rust_log");
        assert_eq!((f.spec.as_str(), f.source), ("debug", "RUST_LOG"));
        let f = LogFilter::from_vars(
            names,
            vars(&[("KEELMQ_LOG", "warn"), ("RUST_LOG", "debug")]),
        )
        .expect("keelmq_log");
        assert_eq!((f.spec.as_str(), f.source), ("warn", "KEELMQ_LOG"));
        // Blank counts as unset (it would otherwise disable every line).
        let f = LogFilter::from_vars(names, vars(&[("KEELMQ_LOG", " "), ("RUST_LOG", "debug")]))
            .expect("blank");
        assert_eq!(f.source, "RUST_LOG");
        // A mistake is an error naming the variable, not a silent fall-back.
        let err = LogFilter::from_vars(
            names,
            vars(&[("KEELMQ_LOG", "debgu"), ("RUST_LOG", "debug")]),
        )
        .expect_err("typo");
        assert!(err.starts_with("KEELMQ_LOG: log filter \"debgu\""), "{err}");
    }
}
