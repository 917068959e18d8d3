//! Directory rules: R1 (suspended recipient), R2 (withdrawn account, ceased organisation),
//! R9 (unregistered or pending sender).
//!
//! Replies follow RFC 3463: X.1.1 "bad destination mailbox address", X.2.1 "mailbox disabled,
//! not accepting messages", X.7.1 "delivery not authorized, message refused".

use super::super::{AddressFacts, Verdicts};
use crate::model::{Address, Reply, RuleId};
use crate::store::{AccountStatus, OrgStatus};

/// Recipient rules at RCPT.
pub(crate) fn recipient(v: &mut Verdicts, rcpt: &Address, facts: &AddressFacts) {
    let Some(org) = &facts.org else { return };
    if org.status == OrgStatus::Ceased {
        // R2, Art. 16.5: the organisation no longer exists; its mailboxes are gone.
        v.violation(
            RuleId::R2,
            rcpt,
            Reply::new(
                550,
                "5.1.1",
                format!(
                    "Recipient <{rcpt}> does not exist: organisation {} has ceased; use the successor organisation's address",
                    org.code
                ),
            ),
        );
        return;
    }
    let Some(account) = &facts.account else {
        return;
    };
    match account.status {
        AccountStatus::Withdrawn => v.violation(
            // R2, Art. 16.3–16.6: a withdrawn name no longer exists as a mailbox.
            RuleId::R2,
            rcpt,
            Reply::new(
                550,
                "5.1.1",
                format!("Recipient <{rcpt}> does not exist: the address has been withdrawn"),
            ),
        ),
        AccountStatus::Suspended => v.violation(
            // R1, Art. 14.1: no mail is sent to a suspended name.
            RuleId::R1,
            rcpt,
            Reply::new(
                550,
                "5.2.1",
                format!("Mailbox <{rcpt}> is suspended and does not accept mail; contact the recipient another way"),
            ),
        ),
        AccountStatus::Pending | AccountStatus::Active => {}
    }
}

/// Sender rules at MAIL.
pub(crate) fn sender(v: &mut Verdicts, sender: &Address, facts: &AddressFacts) {
    let Some(org) = &facts.org else { return };
    if org.status == OrgStatus::Ceased {
        v.violation(
            RuleId::R2,
            sender,
            Reply::new(
                550,
                "5.7.1",
                format!(
                    "Sender <{sender}> may not be used: organisation {} has ceased",
                    org.code
                ),
            ),
        );
        return;
    }
    match facts.account.as_ref().map(|a| a.status) {
        None => v.violation(
            // R9, Art. 20.8: only registered names may send.
            RuleId::R9,
            sender,
            Reply::new(
                553,
                "5.7.1",
                format!("Sender <{sender}> is not a registered government address; register it before sending"),
            ),
        ),
        Some(AccountStatus::Pending) => v.violation(
            RuleId::R9,
            sender,
            Reply::new(
                553,
                "5.7.1",
                format!("Sender <{sender}> is pending approval and may not send yet"),
            ),
        ),
        Some(AccountStatus::Withdrawn) => v.violation(
            // R2, Art. 16.6: a withdrawn name cannot be used as a sender.
            RuleId::R2,
            sender,
            Reply::new(
                550,
                "5.7.1",
                format!("Sender <{sender}> has been withdrawn and may not be used"),
            ),
        ),
        Some(AccountStatus::Active | AccountStatus::Suspended) => {}
    }
}

#[cfg(test)]
mod tests;
