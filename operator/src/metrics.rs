//! Prometheus metrics of the operator: reconciles, their errors and
//! durations per kind, failovers per group, and whether this replica leads,
//! served on `/metrics`.

use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of reconcile metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// BrokerGroup or Topic.
    pub kind: String,
}

/// Labels of error metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// BrokerGroup or Topic.
    pub kind: String,
    /// `Error::metric_label`.
    pub error: String,
}

/// Labels of failover metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// Namespace of the BrokerGroup.
    pub namespace: String,
    /// Its name.
    pub group: String,
}

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<KindLabels, Histogram>,
    failovers: Family<GroupLabels, Counter>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keelmq_operator");
        let reconciles = Family::<KindLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let durations = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        });
        let failovers = Family::<GroupLabels, Counter>::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed", errors.clone());
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles took",
            durations.clone(),
        );
        registry.register(
            "failovers",
            "Masters replaced by promoting another broker",
            failovers.clone(),
        );
        registry.register(
            "leader",
            "1 while this operator replica holds the leader Lease (or runs without leader election) and acts; 0 while it stands by",
            leader.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            reconciles,
            errors,
            durations,
            failovers,
            leader,
        }
    }
}

impl Metrics {
    /// Counts a reconcile; the returned guard records its duration when dropped.
    pub fn reconcile(&self, kind: &str) -> ReconcileTimer<'_> {
        let labels = KindLabels { kind: kind.into() };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            metrics: self,
            labels,
            start: Instant::now(),
        }
    }
    /// Counts a failed reconcile.
    pub fn error(&self, kind: &str, error: &crate::Error) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.into(),
                error: error.metric_label().into(),
            })
            .inc();
    }
    /// Counts a failover of a group.
    pub fn failover(&self, namespace: &str, group: &str) {
        self.failovers
            .get_or_create(&GroupLabels {
                namespace: namespace.into(),
                group: group.into(),
            })
            .inc();
    }
    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
    /// Whether this replica leads (as last recorded).
    pub fn is_leader(&self) -> bool {
        self.leader.get() != 0
    }
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    labels: KindLabels,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .durations
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reconciles_errors_and_failovers() {
        let m = Metrics::default();
        drop(m.reconcile("BrokerGroup"));
        m.error("BrokerGroup", &crate::Error::Conflict);
        m.failover("ns", "orders");
        let text = m.encode();
        assert!(
            text.contains("keelmq_operator_reconciles_total{kind=\"BrokerGroup\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "keelmq_operator_reconcile_errors_total{kind=\"BrokerGroup\",error=\"conflict\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("keelmq_operator_failovers_total{namespace=\"ns\",group=\"orders\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "keelmq_operator_reconcile_duration_seconds_count{kind=\"BrokerGroup\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn leadership_is_a_gauge() {
        let m = Metrics::default();
        assert!(!m.is_leader());
        let text = m.encode();
        assert!(
            text.contains("# TYPE keelmq_operator_leader gauge"),
            "{text}"
        );
        assert!(text.contains("keelmq_operator_leader 0"), "{text}");
        m.set_leader(true);
        assert!(m.is_leader());
        assert!(m.encode().contains("keelmq_operator_leader 1"));
        m.set_leader(false);
        assert!(m.encode().contains("keelmq_operator_leader 0"));
    }
}
