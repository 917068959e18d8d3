//! End to end through real Postfix: a private Postfix instance per test relays to smtp-sink,
//! and mailwarden is wired in with the operator snippets from `deploy/postfix/`.
//!
//! Needs root and the Debian packages `postfix` and `swaks` (`.ci/run` installs them).

mod common;

use common::postfix::{Postfix, Wiring};
use common::smtp::swaks;

/// The harness itself: Postfix without mailwarden takes a message and the sink receives it
/// with the envelope intact.
#[test]
fn bare_postfix_delivers_to_the_sink() {
    let pf = Postfix::start(Wiring::Bare);
    let sent = swaks(&pf.server, "champa@mpt.gov.la", &["cabinet@mof.gov.la"]);
    assert!(sent.queued(), "not queued:\n{}", sent.transcript);
    assert_eq!(sent.status, Some(0), "{}", sent.transcript);
    let d = pf.wait_delivered(&sent.tag);
    assert_eq!(d.mail_from, "champa@mpt.gov.la");
    assert_eq!(d.rcpts, ["cabinet@mof.gov.la"]);
}
