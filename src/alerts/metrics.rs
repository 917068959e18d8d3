//! Metrics of owner alerts (R16), registered in the daemon's one registry by
//! [`crate::telemetry::Metrics::new`].

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: &'static str,
}

/// Counters and gauges of the alert service. Cheap to clone (shared families).
#[derive(Clone)]
pub struct AlertMetrics {
    alerts: Family<AlertLabels, Counter>,
    attempts: Family<ResultLabels, Counter>,
    geoip: Family<ResultLabels, Counter>,
    logins: Family<ResultLabels, Counter>,
    queue_depth: Family<QueueLabels, Gauge>,
}

impl AlertMetrics {
    pub fn register(registry: &mut Registry) -> AlertMetrics {
        let m = AlertMetrics {
            alerts: Family::default(),
            attempts: Family::default(),
            geoip: Family::default(),
            logins: Family::default(),
            queue_depth: Family::default(),
        };
        registry.register(
            "alerts",
            "Owner alerts (R16) by kind (account_locked, new_country_login) and outcome (sent, failed: every attempt failed, dropped: queue full or shutdown, disabled: no webhook configured)",
            m.alerts.clone(),
        );
        registry.register(
            "alert_webhook_attempts",
            "Webhook delivery attempts by result (ok, retryable, refused: a 4xx other than 408/429)",
            m.attempts.clone(),
        );
        registry.register(
            "geoip_lookups",
            "GeoIP lookups of login addresses by result (found, unknown: not in the database, private: loopback/private/link-local address, no_database)",
            m.geoip.clone(),
        );
        registry.register(
            "alert_logins",
            "Authenticated logins fed to new-country detection by result (first_country, known, new_country, not_located, dropped: queue full, store_error)",
            m.logins.clone(),
        );
        registry.register(
            "alert_queue_depth",
            "Items waiting in the alert service's bounded queues (alerts, logins)",
            m.queue_depth.clone(),
        );
        m
    }

    pub fn count_alert(&self, kind: &'static str, outcome: &'static str) {
        self.alerts
            .get_or_create(&AlertLabels { kind, outcome })
            .inc();
    }

    pub fn count_attempt(&self, result: &'static str) {
        self.attempts.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn count_geoip(&self, result: &'static str) {
        self.geoip.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn count_login(&self, result: &'static str) {
        self.logins.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn set_queue_depth(&self, queue: &'static str, depth: usize) {
        self.queue_depth
            .get_or_create(&QueueLabels { queue })
            .set(depth as i64);
    }

    /// The current value of `alerts_total{kind, outcome}` (for tests and health output).
    pub fn alerts(&self, kind: &'static str, outcome: &'static str) -> u64 {
        self.alerts
            .get_or_create(&AlertLabels { kind, outcome })
            .get()
    }
}
