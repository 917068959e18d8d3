//! Changes the daemon makes by itself, audited like the API's with the actor `mailwarden`:
//! - R15: accounts locked for sending by the mail path (`user.lock`), received through the
//!   checker's event hook ([`crate::events`]);
//! - R20: accounts withdrawn for inactivity (`user.withdraw`), when
//!   `[activity] auto_withdraw_after` is set, every `[activity] check_interval`.

use super::api::UserView;
use super::audit::{AuditLog, AuditRecord};
use crate::checker::Checker;
use crate::events::AccountLocked;
use crate::store::Timestamp;
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The actor of changes the daemon makes by itself.
pub const ACTOR: &str = "mailwarden";

fn record(
    action: &'static str,
    object: String,
    before: Value,
    after: Value,
    reason: String,
) -> AuditRecord {
    AuditRecord {
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        actor: ACTOR.into(),
        action,
        object,
        before,
        after,
        reason: Some(reason),
        client_ip: None,
    }
}

async fn write(checker: &Checker, log: &Arc<AuditLog>, records: Vec<AuditRecord>) {
    let path = checker.snapshot().config.admin.audit_log.clone();
    if let Err(e) = log.append(&path, records.clone()).await {
        for r in &records {
            tracing::error!(
                record = %serde_json::to_string(r).unwrap_or_default(),
                "audit log write failed ({e}); the change WAS made; this is its audit record"
            );
        }
    }
}

/// Runs until `shutdown`: audits the locks arriving on `locks` and, when configured,
/// withdraws inactive accounts periodically.
pub async fn run(
    checker: Arc<Checker>,
    mut locks: mpsc::Receiver<AccountLocked>,
    shutdown: CancellationToken,
) {
    let log = AuditLog::new();
    let mut next_check = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = locks.recv() => match event {
                Some(e) => audit_lock(&checker, &log, &e).await,
                None => return,
            },
            _ = tokio::time::sleep_until(next_check) => {
                let activity = checker.snapshot().config.activity.clone();
                next_check = tokio::time::Instant::now() + activity.check_interval;
                if activity.auto_withdraw_after.is_some() {
                    let now = chrono::Utc::now().timestamp();
                    withdraw_inactive(&checker, &log, now).await;
                }
            }
        }
    }
}

async fn audit_lock(checker: &Checker, log: &Arc<AuditLog>, e: &AccountLocked) {
    let after = json!({ "address": e.address.to_string(), "send_lock": e.lock });
    let r = record(
        "user.lock",
        e.address.to_string(),
        json!({ "address": e.address.to_string(), "send_lock": null }),
        after,
        e.lock.cause.to_string(),
    );
    write(checker, log, vec![r]).await;
}

/// One pass of R20's automatic withdrawal at `now` (the clock is the caller's): withdraws
/// the accounts not used for `[activity] auto_withdraw_after`, audits and logs each, and
/// returns how many it withdrew. Nothing happens when the key is unset.
pub async fn withdraw_inactive(checker: &Checker, log: &Arc<AuditLog>, now: Timestamp) -> usize {
    let Some(after) = checker.snapshot().config.activity.auto_withdraw_after else {
        return 0;
    };
    let store = checker.directory.store().clone();
    let changes = match crate::activity::withdraw_inactive(&*store, after, now).await {
        Ok(c) => c,
        Err(e) => {
            checker.metrics.count_store_error("withdraw_inactive");
            tracing::warn!("automatic withdrawal of inactive accounts failed: {e}");
            return 0;
        }
    };
    let mut records = Vec::with_capacity(changes.len());
    for (before, after_change) in &changes {
        checker.directory.invalidate_account(&after_change.address);
        let reason = after_change.status_reason.clone().unwrap_or_default();
        tracing::info!(address = %after_change.address, "account withdrawn automatically (R20): {reason}");
        records.push(record(
            "user.withdraw",
            after_change.address.to_string(),
            serde_json::to_value(UserView::from(before)).unwrap_or(Value::Null),
            serde_json::to_value(UserView::from(after_change)).unwrap_or(Value::Null),
            reason,
        ));
    }
    if !records.is_empty() {
        write(checker, log, records).await;
        checker
            .metrics
            .count_withdrawn_inactive(changes.len() as u64);
        tracing::info!(
            withdrawn = changes.len(),
            "automatic withdrawal of inactive accounts done"
        );
    }
    changes.len()
}
