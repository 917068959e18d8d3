//! Logs and metrics. Every decision becomes one typed event (`record_decision`) that feeds
//! both the log line and the Prometheus counters (R25). Events carry metadata only: rule,
//! stage, addresses, queue id, client; never a subject, body or credential (R23).

mod metrics;

pub use metrics::{ConnectionGuard, Metrics};

use crate::config::LogConfig;
use crate::model::{Decision, Protocol, Stage, Transaction};

/// Installs the global tracing subscriber. `RUST_LOG` overrides `log.level`.
pub fn init_logging(cfg: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if cfg.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Logs and counts one stage's decision.
pub fn record_decision(
    metrics: &Metrics,
    tx: &Transaction,
    stage: Stage,
    decision: &Decision,
    elapsed: std::time::Duration,
) {
    let protocol = tx.protocol;
    metrics.observe_stage(protocol, stage, decision.action.label(), elapsed);
    for o in &decision.outcomes {
        metrics.count_verdict(protocol, o.rule, stage, o.kind);
        let queue_id = tx.queue_id.as_deref().unwrap_or("-");
        let client = tx
            .client_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into());
        match o.kind {
            "fail_open" => tracing::warn!(
                rule = o.rule.as_str(), stage = stage.as_str(), protocol = protocol.as_str(),
                queue_id, client = %client, subject = %o.subject, reply = %o.reply,
                "a service the rule needs is unavailable (store, or DNS for R7); rule configured to fail open, mail accepted"
            ),
            kind => tracing::info!(
                rule = o.rule.as_str(), stage = stage.as_str(), protocol = protocol.as_str(),
                queue_id, client = %client, subject = %o.subject, outcome = kind,
                reply = %o.reply,
                "{}", describe(kind)
            ),
        }
    }
}

fn describe(kind: &str) -> &'static str {
    match kind {
        "reject" => "rejected",
        "tempfail" => "tempfailed",
        "would_reject" => "would reject (monitor mode)",
        "would_tempfail" => "would tempfail (monitor mode)",
        _ => "rule fired",
    }
}

/// A protocol error ended one connection.
pub fn record_protocol_error(metrics: &Metrics, protocol: Protocol, error: &dyn std::fmt::Display) {
    metrics.count_protocol_error(protocol);
    tracing::warn!(
        protocol = protocol.as_str(),
        "connection closed after protocol error: {error}"
    );
}
