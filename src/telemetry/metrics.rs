//! Prometheus metrics (prometheus-client, OpenMetrics text).

use crate::model::{Protocol, RuleId, Stage};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    rule: &'static str,
    stage: &'static str,
    outcome: &'static str,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
    action: &'static str,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    stage: &'static str,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DkimSignedLabels {
    domain: String,
    selector: String,
    algorithm: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthResultLabels {
    method: &'static str,
    result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs … ~3.3 s: the mail path should live in the first buckets.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 17,
    ))
}

/// All metrics of the daemon. Cheap to share (`Arc`).
pub struct Metrics {
    registry: Registry,
    verdicts: Family<VerdictLabels, Counter>,
    decisions: Family<StageLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    connections: Family<ProtocolLabels, Gauge>,
    protocol_errors: Family<ProtocolLabels, Counter>,
    store_errors: Family<OperationLabels, Counter>,
    store_up: Gauge,
    reloads: Family<ResultLabels, Counter>,
    admin_requests: Family<ResultLabels, Counter>,
    dkim_signed: Family<DkimSignedLabels, Counter>,
    dkim_unsigned_tempfail: Family<DomainLabels, Counter>,
    /// Owner alerts (R16): alerts by kind and outcome, GeoIP lookups, queue depths.
    pub alerts: crate::alerts::AlertMetrics,
    auth_results: Family<AuthResultLabels, Counter>,
    account_locks: Family<CauseLabels, Counter>,
    account_unlocks: Counter,
    accounts_withdrawn_inactive: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mailwarden");
        let verdicts = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "verdicts",
            "Rule verdicts by rule, stage, outcome (reject, tempfail, would_reject, would_tempfail, fail_open) and protocol",
            verdicts.clone(),
        );
        let decisions = Family::<StageLabels, Counter>::default();
        registry.register(
            "decisions",
            "Answers given to the MTA by stage, action (continue, reject, tempfail) and protocol",
            decisions.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "stage_duration_seconds",
            "Time to decide one stage, including store lookups",
            latency.clone(),
        );
        let connections = Family::<ProtocolLabels, Gauge>::default();
        registry.register(
            "connections_open",
            "Open MTA connections by protocol",
            connections.clone(),
        );
        let protocol_errors = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "protocol_errors",
            "Connections ended because of malformed or out-of-limit protocol input",
            protocol_errors.clone(),
        );
        let store_errors = Family::<OperationLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Store operations that failed or timed out",
            store_errors.clone(),
        );
        let store_up = Gauge::default();
        registry.register(
            "store_up",
            "1 when the last store health check succeeded",
            store_up.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by result (ok, error)",
            reloads.clone(),
        );
        let admin_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "admin_requests",
            "Admin API requests by result (ok, client_error, unauthorized, forbidden, server_error)",
            admin_requests.clone(),
        );
        let dkim_signed = Family::<DkimSignedLabels, Counter>::default();
        registry.register(
            "dkim_signed",
            "DKIM signatures added (R6), by signing domain, selector and algorithm",
            dkim_signed.clone(),
        );
        let dkim_unsigned_tempfail = Family::<DomainLabels, Counter>::default();
        registry.register(
            "dkim_unsigned_tempfail",
            "Outbound messages of a local domain tempfailed (451 4.7.5) because they could not be signed: no key, or signing failed",
            dkim_unsigned_tempfail.clone(),
        );
        let alerts = crate::alerts::AlertMetrics::register(&mut registry);
        let auth_results = Family::<AuthResultLabels, Counter>::default();
        registry.register(
            "auth_results",
            "Inbound verification results (R7) by method (spf, dkim, dmarc, arc) and result (pass, fail, softfail, neutral, temperror, permerror, none)",
            auth_results.clone(),
        );
        let account_locks = Family::<CauseLabels, Counter>::default();
        registry.register(
            "account_locks",
            "Accounts locked for sending (R15), by cause: burst, rejections (automatic), manual (admin API)",
            account_locks.clone(),
        );
        let account_unlocks = Counter::default();
        registry.register(
            "account_unlocks",
            "Sending locks released through the admin API (R15)",
            account_unlocks.clone(),
        );
        let accounts_withdrawn_inactive = Counter::default();
        registry.register(
            "accounts_withdrawn_inactive",
            "Accounts withdrawn automatically for inactivity (R20, [activity] auto_withdraw_after)",
            accounts_withdrawn_inactive.clone(),
        );
        Metrics {
            alerts,
            registry,
            auth_results,
            account_locks,
            account_unlocks,
            accounts_withdrawn_inactive,
            dkim_signed,
            dkim_unsigned_tempfail,
            verdicts,
            decisions,
            latency,
            connections,
            protocol_errors,
            store_errors,
            store_up,
            reloads,
            admin_requests,
        }
    }

    pub fn count_verdict(
        &self,
        protocol: Protocol,
        rule: RuleId,
        stage: Stage,
        outcome: &'static str,
    ) {
        self.verdicts
            .get_or_create(&VerdictLabels {
                rule: rule.as_str(),
                stage: stage.as_str(),
                outcome,
                protocol: protocol.as_str(),
            })
            .inc();
    }

    pub fn observe_stage(
        &self,
        protocol: Protocol,
        stage: Stage,
        action: &'static str,
        elapsed: Duration,
    ) {
        self.decisions
            .get_or_create(&StageLabels {
                stage: stage.as_str(),
                action,
                protocol: protocol.as_str(),
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                stage: stage.as_str(),
                protocol: protocol.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a connection open until the returned guard is dropped.
    pub fn connection(&self, protocol: Protocol) -> ConnectionGuard {
        let g = self.connections.get_or_create_owned(&ProtocolLabels {
            protocol: protocol.as_str(),
        });
        g.inc();
        ConnectionGuard(g)
    }

    pub fn count_protocol_error(&self, protocol: Protocol) {
        self.protocol_errors
            .get_or_create(&ProtocolLabels {
                protocol: protocol.as_str(),
            })
            .inc();
    }

    pub fn count_store_error(&self, operation: &'static str) {
        self.store_errors
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(up as i64);
    }

    pub fn count_reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn count_admin_request(&self, result: &'static str) {
        self.admin_requests
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// One DKIM signature added. Label values are configured key domains and selectors
    /// (bounded by the config).
    pub fn count_dkim_signed(&self, domain: &str, selector: &str, algorithm: &'static str) {
        self.dkim_signed
            .get_or_create(&DkimSignedLabels {
                domain: domain.to_owned(),
                selector: selector.to_owned(),
                algorithm,
            })
            .inc();
    }

    /// An outbound message of a local `domain` refused because it could not be signed
    /// (bounded by the organisation domains in the directory).
    pub fn count_dkim_unsigned_tempfail(&self, domain: &str) {
        self.dkim_unsigned_tempfail
            .get_or_create(&DomainLabels {
                domain: domain.to_owned(),
            })
            .inc();
    }

    /// Exposes a networked store's round-trip statistics (`store_round_trips`,
    /// `store_round_trip_failures`, `store_round_trip_seconds`). Call before sharing.
    pub fn register_store(&mut self, stats: crate::store::StoreStats) {
        self.registry.register(
            "store_round_trips",
            "Round trips to the store server (Redis), retries included",
            stats.round_trips,
        );
        self.registry.register(
            "store_round_trip_failures",
            "Store round trips that failed: connection lost, timeout or server error",
            stats.failures,
        );
        self.registry.register(
            "store_round_trip_seconds",
            "Time per store call (one round trip, two when retried)",
            stats.latency,
        );
    }

    /// One inbound verification result (R7); DKIM counts once per signature.
    pub fn count_auth_result(&self, method: &'static str, result: &'static str) {
        self.auth_results
            .get_or_create(&AuthResultLabels { method, result })
            .inc();
    }

    /// An account was locked for sending (R15); `cause` is a [`crate::store::LockCause`] kind.
    pub fn count_account_lock(&self, cause: &'static str) {
        self.account_locks
            .get_or_create(&CauseLabels { cause })
            .inc();
    }

    pub fn count_account_unlock(&self) {
        self.account_unlocks.inc();
    }

    pub fn count_withdrawn_inactive(&self, n: u64) {
        self.accounts_withdrawn_inactive.inc_by(n);
    }

    /// OpenMetrics text for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String cannot fail");
        out
    }
}

/// Decrements the open-connections gauge when dropped.
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_and_connections_appear_in_the_exposition() {
        let m = Metrics::new();
        m.count_verdict(Protocol::Policy, RuleId::R1, Stage::Rcpt, "reject");
        m.observe_stage(
            Protocol::Policy,
            Stage::Rcpt,
            "reject",
            Duration::from_micros(120),
        );
        let guard = m.connection(Protocol::Milter);
        let text = m.encode();
        assert!(
            text.contains(r#"mailwarden_verdicts_total{rule="R1",stage="rcpt",outcome="reject",protocol="policy"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mailwarden_connections_open{protocol="milter"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("mailwarden_stage_duration_seconds_bucket"),
            "{text}"
        );
        drop(guard);
        assert!(
            m.encode()
                .contains(r#"mailwarden_connections_open{protocol="milter"} 0"#)
        );
    }

    #[test]
    fn store_round_trips_are_exposed_from_the_stores_own_counters() {
        let mut m = Metrics::new();
        let stats = crate::store::StoreStats::default();
        m.register_store(stats.clone());
        stats.round_trips.inc_by(3);
        stats.failures.inc();
        stats.latency.observe(0.0002);
        let text = m.encode();
        assert!(
            text.contains("mailwarden_store_round_trips_total 3"),
            "{text}"
        );
        assert!(
            text.contains("mailwarden_store_round_trip_failures_total 1"),
            "{text}"
        );
        assert!(
            text.contains("mailwarden_store_round_trip_seconds_count 1"),
            "{text}"
        );
    }
}
