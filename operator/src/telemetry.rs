//! Logging: `tracing` to stderr as text (for people) or JSON (for log
//! pipelines); the filter comes from `RUST_LOG` (default `info`), checked as
//! the broker checks its own: a filter with a mistake (a misspelt level
//! such as `debgu`, which tracing would read as a target and so silence
//! every other line) stops the operator at start.

use keelmq_broker::telemetry::LogFilter;
use tracing_subscriber::util::SubscriberInitExt;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The variable the operator's filter comes from.
pub const FILTER_VARIABLE: &str = "RUST_LOG";

/// The operator's log filter, from `get` (reads a variable): `RUST_LOG`,
/// default `info`.
pub fn filter_from(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<LogFilter, String> {
    LogFilter::from_vars(&[FILTER_VARIABLE], get)
}

/// Installs the global subscriber with `filter` and logs the filter in force.
pub fn install(format: LogFormat, filter: LogFilter) {
    let (spec, source) = (filter.spec.clone(), filter.source);
    let _ = subscriber(format, filter, std::io::stderr).try_init();
    announce(&spec, source);
}

/// The broker's subscriber (JSON lines carry the current span and the span
/// list, as before).
fn subscriber<W>(format: LogFormat, filter: LogFilter, writer: W) -> tracing::Dispatch
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let format = match format {
        LogFormat::Text => keelmq_broker::config::LogFormat::Text,
        LogFormat::Json => keelmq_broker::config::LogFormat::Json,
    };
    keelmq_broker::telemetry::subscriber(format, filter.into_env_filter(), writer)
}

/// The start-up line naming the filter in force and where it came from.
fn announce(spec: &str, source: &str) {
    tracing::info!(filter = %spec, from = source, "log filter in force");
}

/// Installs the global subscriber with the filter of `RUST_LOG`; a filter
/// with a mistake is an error.
pub fn try_init(format: LogFormat) -> Result<(), String> {
    install(format, filter_from(|n| std::env::var_os(n))?);
    Ok(())
}

/// [`try_init`] for test harnesses: a filter with a mistake is reported on
/// stderr and `info` used instead.
pub fn init(format: LogFormat) {
    if let Err(e) = try_init(format) {
        eprintln!("keelmq-operator: {e}; logging at info instead");
        if let Ok(f) = LogFilter::parse("info", "default") {
            install(format, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    #[test]
    fn rust_log_is_checked_and_a_misspelt_level_refused() {
        let from = |v: Option<&'static str>| filter_from(move |_| v.map(OsString::from));
        let f = from(None).expect("default");
        assert_eq!((f.spec.as_str(), f.source), ("info", "default"));
        let f = from(Some("info,keelmq_operator=debug")).expect("the chart's example");
        assert_eq!(
            (f.spec.as_str(), f.source),
            ("info,keelmq_operator=debug", "RUST_LOG")
        );
        from(Some("kube_runtime")).expect("a known crate");
        let err = from(Some("debgu")).expect_err("tracing would read a target");
        assert!(
            err.starts_with("RUST_LOG: log filter \"debgu\"")
                && err.contains("Did you mean \"debug\"?"),
            "{err}"
        );
        assert!(from(Some("info,keelmq_operator=verbose")).is_err());
    }

    use keelmq_broker::testing::Captured;

    #[test]
    fn the_filter_in_force_is_logged_at_start() {
        let out = Captured::default();
        let f = filter_from(|_| Some("info,kube=warn".into())).expect("valid");
        let (spec, source) = (f.spec.clone(), f.source);
        let w = out.clone();
        let d = subscriber(LogFormat::Json, f, move || w.clone());
        tracing::dispatcher::with_default(&d, || announce(&spec, source));
        let text = out.text();
        assert!(
            text.contains("log filter in force")
                && text.contains("info,kube=warn")
                && text.contains("RUST_LOG")
                && text.contains("keelmq_operator::telemetry"),
            "{text}"
        );
    }
}
