//! indymilter callbacks: thin adapters. Each one extracts its arguments and macros, updates
//! the [`Session`], asks the checker at the stages that have rules (MAIL, RCPT), and turns
//! the decision into a milter status. An unexpected failure tempfails the message, logged
//! with its queue id; it never lets the message through unchecked.

use super::negotiate::Features;
use super::session::{CallbackError, Session, Verifying};
use crate::checker::Checker;
use crate::dkim::MessageSigner;
use crate::engine::rules::spoofing::Source;
use crate::model::{Action, Mode, Protocol, Reply, RuleId, Sender, Transaction};
use crate::telemetry;
use crate::verify::{self, Envelope};
use futures_util::FutureExt as _;
use indymilter::{
    Actions, Callbacks, Context, ContextActions as _, EomActions, EomContext, NegotiateContext,
    ProtoOpts, SetErrorReply as _, SmtpReply, SocketInfo, Status,
};
use std::{ffi::CString, future::Future, panic::AssertUnwindSafe, sync::Arc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// What every callback of every connection shares.
pub(crate) struct Shared {
    pub checker: Arc<Checker>,
    pub features: Features,
    /// Cancelled when the daemon stops: new messages are refused from then on.
    pub shutdown: CancellationToken,
    /// One token per message in flight; the shutdown drain waits for them.
    pub messages: TaskTracker,
}

pub(crate) fn build(shared: Arc<Shared>) -> Callbacks<Session> {
    let s = shared;
    Callbacks::new()
        .on_negotiate({
            let s = s.clone();
            move |cx, actions, opts| Box::pin(negotiate(s.clone(), cx, actions, opts))
        })
        .on_connect({
            let s = s.clone();
            move |cx, hostname, socket| Box::pin(connect(s.clone(), cx, hostname, socket))
        })
        .on_helo({
            let s = s.clone();
            move |cx, name| Box::pin(helo(s.clone(), cx, name))
        })
        .on_mail({
            let s = s.clone();
            move |cx, args| Box::pin(mail(s.clone(), cx, args))
        })
        .on_rcpt({
            let s = s.clone();
            move |cx, args| Box::pin(rcpt(s.clone(), cx, args))
        })
        .on_data({
            let s = s.clone();
            move |cx| Box::pin(data(s.clone(), cx))
        })
        .on_header({
            let s = s.clone();
            move |cx, name, value| Box::pin(header(s.clone(), cx, name, value))
        })
        .on_eoh({
            let s = s.clone();
            move |cx| Box::pin(eoh(s.clone(), cx))
        })
        .on_body({
            let s = s.clone();
            move |cx, chunk| Box::pin(body(s.clone(), cx, chunk))
        })
        .on_eom({
            let s = s.clone();
            move |cx| Box::pin(eom(s.clone(), cx))
        })
        .on_abort(|cx| Box::pin(abort(cx)))
        .on_close(|cx| Box::pin(close(cx)))
}

/// The session of this connection, created on first use (normally at negotiation).
fn session<'a>(s: &Shared, data: &'a mut Option<Session>) -> &'a mut Session {
    data.get_or_insert_with(|| Session::new(s.checker.metrics.connection(Protocol::Milter)))
}

async fn negotiate(
    s: Arc<Shared>,
    cx: &mut NegotiateContext<Session>,
    mta_actions: Actions,
    mta_opts: ProtoOpts,
) -> Status {
    // The DKIM signer, send-as (R8) and inbound verification (R7) are switched on per
    // connection by the config in force: a reload applies to the MTA's next connection.
    let snap = s.checker.snapshot();
    let mut features = s.features;
    if snap.config.dkim.enabled() {
        features = features.with_dkim();
    }
    if snap.policy.rule(RuleId::R8).mode != Mode::Off {
        features = features.with_headers();
    }
    let authserv_id = snap.verification.as_ref().map(|v| v.authserv_id.clone());
    if authserv_id.is_some() {
        features = features.with_verify();
    }
    // Headers and body for the signer or the verifier (content they keep and judge), before
    // R13 asks for them only to count their bytes.
    let content = features.headers && features.body;
    if crate::checker::milter_measures_sizes(&snap) {
        features = features.with_sizes();
    }
    let by_policy = snap.config.server.milter_envelope == crate::config::MilterEnvelope::Policy;
    if by_policy {
        features = features.with_envelope_by_policy();
    }
    match features.negotiate(mta_actions, mta_opts) {
        Ok(n) => {
            cx.requested_actions = n.actions;
            cx.requested_opts = n.opts;
            cx.requested_macros = n.macros;
            let sess = session(&s, &mut cx.data);
            let measures = features.headers && features.body;
            sess.negotiated(features.headers, content, measures, n.opts);
            sess.verify_with(authserv_id);
            if by_policy {
                sess.envelope_by_policy();
            }
            Status::Continue
        }
        Err(e) => {
            // Any status but Continue ends the connection; the MTA applies its default action.
            telemetry::record_protocol_error(&s.checker.metrics, Protocol::Milter, &e);
            Status::Reject
        }
    }
}

async fn connect(
    s: Arc<Shared>,
    cx: &mut Context<Session>,
    hostname: CString,
    socket: SocketInfo,
) -> Status {
    let ip = match socket {
        SocketInfo::Inet(addr) => Some(addr.ip()),
        SocketInfo::Unix(_) | SocketInfo::Unknown => None,
    };
    let sess = session(&s, &mut cx.data);
    sess.connect(&hostname.to_string_lossy(), ip, &cx.macros);
    // Recorded for later stages; nothing is judged here (R7's SPF verdicts come at end of
    // message), so no reply when the MTA agreed to wait for none.
    sess.continue_status(ProtoOpts::NOREPLY_CONNECT)
}

async fn helo(s: Arc<Shared>, cx: &mut Context<Session>, name: CString) -> Status {
    let sess = session(&s, &mut cx.data);
    sess.helo(&name.to_string_lossy(), &cx.macros);
    sess.continue_status(ProtoOpts::NOREPLY_HELO)
}

async fn mail(s: Arc<Shared>, cx: &mut Context<Session>, args: Vec<CString>) -> Status {
    let sess = session(&s, &mut cx.data);
    if let Some(status) = sess.mail_status() {
        return mail_judged_by_policy(&s, sess, &cx.macros, args, status);
    }
    if s.shutdown.is_cancelled() {
        // Draining: no new message starts.
        sess.end_message();
        return answer(&mut cx.reply, &shutting_down(), &sess.tx);
    }
    if let Err(e) = sess.mail(&strings(args), &cx.macros) {
        return internal_error(sess, &mut cx.reply, "mail", &e);
    }
    match guarded(s.checker.check_mail(&sess.tx)).await {
        Ok(d) => {
            let status = answer(&mut cx.reply, &d.action, &sess.tx);
            if status == Status::Continue {
                sess.message_started(s.messages.token());
            }
            status
        }
        Err(e) => internal_error(sess, &mut cx.reply, "mail", &e),
    }
}

/// No new message while draining: the client retries (another instance, or us after the
/// restart). RFC 3463 X.3.2: system not accepting network messages.
fn shutting_down() -> Action {
    Action::Tempfail(Reply::new(
        421,
        "4.3.2",
        "Service shutting down, please try again later",
    ))
}

/// A memory bound on a message's recipients, far above any MTA's recipient limit.
/// RFC 5321 §4.5.3.1.10.
fn too_many_recipients() -> Action {
    Action::Tempfail(Reply::new(452, "4.5.3", "Too many recipients"))
}

/// MAIL when the policy service judges it (`server.milter_envelope = "policy"`): the
/// envelope is read (signing, send-as and sizes need it) and nothing is answered; what must
/// refuse the message (shutting down, an internal error) is answered at end of message.
fn mail_judged_by_policy(
    s: &Shared,
    sess: &mut Session,
    macros: &indymilter::Macros,
    args: Vec<CString>,
    status: Status,
) -> Status {
    if let Err(e) = sess.mail(&strings(args), macros) {
        failure(sess, "mail", &CallbackError::Internal(e.to_string()));
        return status;
    }
    if s.shutdown.is_cancelled() {
        // Draining: as at MAIL when judged here, at end of message.
        sess.defer(shutting_down());
    } else {
        sess.message_started(s.messages.token());
    }
    status
}

/// RCPT when the policy service judges it: the recipient is kept for the message (R13's
/// sizes) and nothing is answered.
fn rcpt_judged_by_policy(
    sess: &mut Session,
    macros: &indymilter::Macros,
    args: Vec<CString>,
    status: Status,
) -> Status {
    if sess.message_failed() || sess.has_deferred() {
        return status;
    }
    match sess.rcpt(&strings(args), macros) {
        Ok(Some(rcpt)) if sess.has_room_for_rcpt() => sess.accept_rcpt(rcpt),
        Ok(Some(_)) => {
            // The memory bound, far above any MTA's recipient limit: the message is
            // tempfailed at its end rather than kept without all its recipients.
            sess.defer(too_many_recipients());
        }
        Ok(None) => {}
        Err(e) => {
            failure(sess, "rcpt", &CallbackError::Internal(e.to_string()));
        }
    }
    status
}

async fn rcpt(s: Arc<Shared>, cx: &mut Context<Session>, args: Vec<CString>) -> Status {
    let sess = session(&s, &mut cx.data);
    if let Some(status) = sess.rcpt_status() {
        return rcpt_judged_by_policy(sess, &cx.macros, args, status);
    }
    if sess.message_failed() {
        return failed_message(sess, &mut cx.reply);
    }
    let rcpt = match sess.rcpt(&strings(args), &cx.macros) {
        Ok(Some(rcpt)) => rcpt,
        // Not a directory name (`<postmaster>`): no rule applies.
        Ok(None) => return Status::Continue,
        Err(e) => return internal_error(sess, &mut cx.reply, "rcpt", &e),
    };
    if !sess.has_room_for_rcpt() {
        return answer(&mut cx.reply, &too_many_recipients(), &sess.tx);
    }
    match guarded(s.checker.check_rcpt(&sess.tx, &rcpt)).await {
        Ok(d) => {
            // A refusal concerns this recipient only; the message goes on for the others.
            let status = answer(&mut cx.reply, &d.action, &sess.tx);
            if status == Status::Continue {
                sess.accept_rcpt(rcpt);
            }
            status
        }
        Err(e) => internal_error(sess, &mut cx.reply, "rcpt", &e),
    }
}

async fn data(s: Arc<Shared>, cx: &mut Context<Session>) -> Status {
    let sess = session(&s, &mut cx.data);
    sess.refresh(&cx.macros);
    if sess.message_failed() {
        return failed_message(sess, &mut cx.reply);
    }
    Status::Continue
}

async fn header(
    s: Arc<Shared>,
    cx: &mut Context<Session>,
    name: CString,
    value: CString,
) -> Status {
    let sess = session(&s, &mut cx.data);
    sess.header(name.as_bytes(), value.as_bytes());
    sess.header_status()
}

/// End of headers: R8 judges the `From:` and `Sender:` fields; then R6 decides whether the
/// message is signed (the From domain is known now). Postfix gives a refusal found here
/// after the end of DATA; so when it agreed to wait for no reply here (`NOREPLY_EOH`, one
/// round trip less per message), the verdict is kept and answered at end of message.
async fn eoh(s: Arc<Shared>, cx: &mut Context<Session>) -> Status {
    let sess = session(&s, &mut cx.data);
    sess.refresh(&cx.macros);
    let action = eoh_verdict(&s, sess).await;
    if sess.noreply_eoh() {
        if action != Action::Continue {
            sess.defer(action);
        }
        return Status::Noreply;
    }
    answer(&mut cx.reply, &action, &sess.tx)
}

async fn eoh_verdict(s: &Shared, sess: &mut Session) -> Action {
    if sess.message_failed() {
        return Action::Tempfail(Reply::store_unavailable());
    }
    if sess.has_deferred() {
        // Already refused (at MAIL or RCPT, answered at end of message).
        return Action::Continue;
    }
    if !sess.sees_headers() {
        return Action::Continue;
    }
    let sendas = match guarded(s.checker.check_headers(&sess.tx)).await {
        Ok(d) => d,
        Err(e) => return failure(sess, "eoh", &e),
    };
    if sendas.action != Action::Continue || !sess.sees_content() {
        return sendas.action;
    }
    let mut signing = match guarded(s.checker.check_signing(&sess.tx)).await {
        Ok(signing) => signing,
        Err(e) => return failure(sess, "eoh", &e),
    };
    if signing.decision.action != Action::Continue {
        return signing.decision.action;
    }
    if signing.keys.is_empty() {
        // Not signed (not outbound, or not ours): inbound mail is verified (R7), whose
        // decision is then the message's end-of-message decision; else R6's pass is.
        let mut verified = false;
        if sess.verifies() {
            match guarded(s.checker.inbound_source(&sess.tx)).await {
                Ok(Some(Source::Authorised)) | Ok(None) => {}
                Ok(Some(source)) => {
                    verified = true;
                    let max = s
                        .checker
                        .snapshot()
                        .verification
                        .as_ref()
                        .map_or(0, |v| v.max_message_size);
                    sess.start_verifying(source, max);
                }
                Err(e) => return failure(sess, "eoh", &e),
            }
        }
        if !verified {
            s.checker.record_signing(&sess.tx, &mut signing);
        }
        return Action::Continue;
    }
    let domain = signing.domain.unwrap_or_default();
    match sess.start_signing(&domain, &signing.keys) {
        Ok(()) => Action::Continue,
        Err(e) => s.checker.signing_failed(&sess.tx, &domain, &e).action,
    }
}

async fn body(s: Arc<Shared>, cx: &mut Context<Session>, chunk: impl AsRef<[u8]>) -> Status {
    let sess = session(&s, &mut cx.data);
    sess.body(chunk.as_ref());
    sess.body_status()
}

/// End of message: R13 with the measured size (when headers and body arrive: for a content
/// rule such as DKIM signing, or because R13's end of message is the milter's, see
/// [`milter_measures_sizes`](crate::checker::milter_measures_sizes)), then R6's signatures.
/// When the message is accepted, its size is counted into its recipients' usage.
async fn eom(s: Arc<Shared>, cx: &mut EomContext<Session>) -> Status {
    let sess = session(&s, &mut cx.data);
    let measured = sess.measures_size() || s.features.body;
    sess.end_of_message(&cx.macros, measured);
    let deferred = sess.take_deferred();
    let status = if sess.message_failed() {
        failed_message(sess, &mut cx.reply)
    } else if let Some(action) = deferred {
        // A verdict kept for end of message (see `eoh`, and MAIL and RCPT when the policy
        // service judges them).
        answer(&mut cx.reply, &action, &sess.tx)
    } else {
        let quota = match (measured, sess.tx.size) {
            (true, Some(size)) => {
                let check = s
                    .checker
                    .check_end_of_message(&sess.tx, &sess.tx.recipients, size);
                match guarded(check).await {
                    Ok(eom) => Some(eom),
                    Err(e) => {
                        let status = internal_error(sess, &mut cx.reply, "eom", &e);
                        sess.end_message();
                        return status;
                    }
                }
            }
            _ => None,
        };
        let quota_status = match &quota {
            Some(eom) => answer(&mut cx.reply, &eom.decision.action, &sess.tx),
            None => Status::Continue,
        };
        let status = if quota_status != Status::Continue {
            quota_status
        } else if let Some(v) = sess.take_verifying() {
            verify_inbound(&s, sess, &mut cx.reply, &cx.actions, v).await
        } else {
            let status = match sess.take_signer() {
                Some((domain, signer)) => {
                    sign(&s, sess, &mut cx.reply, &cx.actions, &domain, signer).await
                }
                None => Status::Continue,
            };
            // Outbound and authorised mail is not verified, but an `Authentication-Results`
            // claiming our authserv-id is a forgery there too (a local recipient's reader would
            // trust it): removed from every message while R7 is on. Never signed (not in h=).
            if status == Status::Continue && sess.verifies() {
                match remove_forged(sess, &cx.actions).await {
                    Ok(_) => status,
                    Err(e) => internal_error(sess, &mut cx.reply, "eom", &e),
                }
            } else {
                status
            }
        };
        if let (Status::Continue, Some(eom)) = (status, quota) {
            s.checker.delivered(eom);
        }
        status
    };
    sess.end_message();
    status
}

/// Deletes the `Authentication-Results` headers claiming our authserv-id (highest index
/// first, so the others keep their numbers; an empty value deletes). Returns how many.
async fn remove_forged(sess: &Session, actions: &EomActions) -> Result<usize, CallbackError> {
    let forged = sess
        .forged_authentication_results()
        .map_err(|e| CallbackError::Internal(e.to_string()))?;
    for index in &forged {
        actions
            .change_header("Authentication-Results", *index, None::<CString>)
            .await
            .map_err(|e| CallbackError::Internal(format!("cannot delete a forged header: {e}")))?;
    }
    Ok(forged.len())
}

/// R6 at end of message: finish the signatures and insert them at the top of the header,
/// or tempfail — a message of a local domain never leaves unsigned.
async fn sign(
    s: &Shared,
    sess: &Session,
    reply: &mut SmtpReply,
    actions: &EomActions,
    domain: &str,
    signer: MessageSigner,
) -> Status {
    let sigs = match signer.finish() {
        Ok(sigs) => sigs,
        Err(e) => {
            let d = s.checker.signing_failed(&sess.tx, domain, &e);
            return answer(reply, &d.action, &sess.tx);
        }
    };
    for sig in &sigs {
        let value = sess.inserted_value(&sig.milter_value());
        if let Err(e) = actions.insert_header(0, "DKIM-Signature", value).await {
            let d = s.checker.signing_failed(&sess.tx, domain, &e);
            return answer(reply, &d.action, &sess.tx);
        }
    }
    for sig in &sigs {
        s.checker
            .metrics
            .count_dkim_signed(&sig.domain, &sig.selector, sig.algorithm.as_str());
    }
    tracing::info!(
        queue_id = sess.tx.queue_id.as_deref().unwrap_or("-"),
        domain,
        selectors = %sigs.iter().map(|g| format!("{}({})", g.selector, g.algorithm.as_str())).collect::<Vec<_>>().join(","),
        "DKIM signed"
    );
    Status::Continue
}

/// R7 at end of message: verify (SPF, DKIM, ARC, DMARC), decide, and — when the message
/// goes on — delete forged `Authentication-Results` claiming our authserv-id and insert ours
/// at the top (RFC 8601 §5: a receiver removes copies it did not add).
async fn verify_inbound(
    s: &Shared,
    sess: &mut Session,
    reply: &mut SmtpReply,
    actions: &EomActions,
    v: Verifying,
) -> Status {
    let snap = s.checker.snapshot();
    let (Some(cfg), Some(authserv_id)) = (snap.verification.as_ref(), sess.authserv_id()) else {
        // R7 was switched off by a reload during the message.
        return Status::Continue;
    };
    let authserv_id = authserv_id.to_owned();
    let mail_from = match &sess.tx.sender {
        Some(Sender::Null) => Some(String::new()),
        Some(Sender::Address(a)) => Some(a.to_string()),
        _ => None,
    };
    let envelope = Envelope {
        client_ip: sess.tx.client_addr,
        helo: sess.tx.helo.as_deref(),
        mail_from: mail_from.as_deref(),
    };
    let report = match &cfg.resolver {
        Some(r) => verify::verify(r, &authserv_id, envelope, &v.message, v.body_kept).await,
        None => verify::Report::dns_failure(&authserv_id),
    };
    drop(v.message);
    let d = match guarded(s.checker.check_spoofing(&sess.tx, &v.source, &report)).await {
        Ok(d) => d,
        Err(e) => return internal_error(sess, reply, "eom", &e),
    };
    let status = answer(reply, &d.action, &sess.tx);
    if status != Status::Continue {
        return status;
    }
    let forged = match remove_forged(sess, actions).await {
        Ok(n) => n,
        Err(e) => return internal_error(sess, reply, "eom", &e),
    };
    let value = sess.inserted_value(&report.milter_value());
    if let Err(e) = actions
        .insert_header(0, "Authentication-Results", value)
        .await
    {
        let e = CallbackError::Internal(format!("cannot add Authentication-Results: {e}"));
        return internal_error(sess, reply, "eom", &e);
    }
    tracing::info!(
        queue_id = sess.tx.queue_id.as_deref().unwrap_or("-"),
        results = %report.results.iter().map(|(m, r)| format!("{m}={r}")).collect::<Vec<_>>().join(" "),
        forged_removed = forged,
        "inbound message verified"
    );
    Status::Continue
}

async fn abort(cx: &mut Context<Session>) -> Status {
    if let Some(sess) = cx.data.as_mut() {
        sess.end_message();
    }
    Status::Continue
}

async fn close(cx: &mut Context<Session>) -> Status {
    cx.data = None;
    Status::Continue
}

fn strings(args: Vec<CString>) -> Vec<String> {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// Runs a checker call; a panic inside it becomes an error for this message only.
async fn guarded<T>(fut: impl Future<Output = T>) -> Result<T, CallbackError> {
    AssertUnwindSafe(fut).catch_unwind().await.map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        CallbackError::Internal(msg)
    })
}

/// Maps the checker's action to a milter status, with the rule's reply.
fn answer(reply: &mut SmtpReply, action: &Action, tx: &Transaction) -> Status {
    match action {
        Action::Continue => Status::Continue,
        Action::Reject(r) => {
            set_reply(reply, r, tx);
            Status::Reject
        }
        Action::Tempfail(r) => {
            set_reply(reply, r, tx);
            Status::Tempfail
        }
    }
}

fn set_reply(reply: &mut SmtpReply, r: &Reply, tx: &Transaction) {
    let code = r.code.to_string();
    if let Err(e) = reply.set_error_reply(&code, Some(r.enhanced), [reply_text(&r.text)]) {
        // Still a refusal: the MTA uses its generic text for the same class of reply.
        tracing::warn!(
            queue_id = tx.queue_id.as_deref().unwrap_or("-"),
            "reply \"{r}\" not accepted by the milter library: {e}"
        );
    }
}

/// Postfix and Sendmail treat `%` in milter reply text as an escape: double it. The
/// protocol allows 980 bytes per line.
pub(crate) fn reply_text(text: &str) -> String {
    const MAX: usize = 980;
    let mut out = String::with_capacity(text.len().min(MAX));
    let mut buf = [0; 4];
    for c in text.chars() {
        let piece: &str = if c == '%' {
            "%%"
        } else {
            c.encode_utf8(&mut buf)
        };
        if out.len() + piece.len() > MAX {
            break;
        }
        out.push_str(piece);
    }
    out
}

fn internal_error(
    sess: &mut Session,
    reply: &mut SmtpReply,
    stage: &'static str,
    err: &CallbackError,
) -> Status {
    let action = failure(sess, stage, err);
    answer(reply, &action, &sess.tx)
}

/// An internal error: the message is marked failed (every later stage answers `451 4.3.0`)
/// and logged; returns that answer.
fn failure(sess: &mut Session, stage: &'static str, err: &CallbackError) -> Action {
    sess.fail_message();
    tracing::error!(
        queue_id = sess.tx.queue_id.as_deref().unwrap_or("-"),
        client = %sess.tx.client_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        stage,
        "milter callback failed: {err}; message tempfailed"
    );
    Action::Tempfail(Reply::store_unavailable())
}

/// Every stage of a message that hit an internal error answers `451 4.3.0`.
fn failed_message(sess: &Session, reply: &mut SmtpReply) -> Status {
    answer(
        reply,
        &Action::Tempfail(Reply::store_unavailable()),
        &sess.tx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Decision;

    #[test]
    fn reply_text_escapes_percent_and_fits_one_line() {
        assert_eq!(reply_text("100% sure"), "100%% sure");
        let long = reply_text(&"%".repeat(600));
        assert_eq!(long.len(), 980);
        assert!(long.chars().all(|c| c == '%'));
        let s = reply_text(&"é".repeat(1000));
        assert!(s.len() <= 980 && s.is_char_boundary(s.len()));
    }

    #[tokio::test]
    async fn a_panicking_check_is_an_error_not_a_crash() {
        let r = guarded(async { panic!("boom") }).await;
        assert_eq!(r, Err(CallbackError::Internal("boom".into())));
        let ok = guarded(async { Decision::pass() }).await;
        assert_eq!(ok, Ok(Decision::pass()));
    }
}
