//! What the milter asks of the MTA at negotiation: actions, skipped stages, macros per stage.

use indymilter::{Actions, MacroStage, ProtoOpts};
use std::{collections::HashMap, ffi::CString};

/// Message modifications requested at end of message by the envelope rules: none. The DKIM
/// signer (R6) adds `Actions::ADD_HEADER` (it covers both `add_header` and `insert_header`),
/// see [`Features::with_dkim`].
pub const ACTIONS: Actions = Actions::empty();

/// What this build needs from the MTA. Stages not needed are skipped at negotiation, which
/// saves one round trip per header or body chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// End-of-message actions to request (see [`ACTIONS`]).
    pub actions: Actions,
    /// Receive each header and the end of headers. Needed by header rules (R7, R8, R19) and
    /// by the DKIM signer.
    pub headers: bool,
    /// Receive the body chunks. Needed by the DKIM signer (body hash) and content scanning.
    pub body: bool,
    /// Receive HELO as a stage of its own. Needed by rules that judge the HELO name (SPF
    /// HELO, R7). CONNECT never is: the client address and name arrive as macros at MAIL
    /// (asked for there), and the TLS state at HELO and MAIL. Every stage skipped saves a
    /// packet and a wake-up of this daemon per SMTP session.
    pub helo: bool,
    /// MAIL and RCPT are judged by the policy service (`server.milter_envelope =
    /// "policy"`): the milter reads them but asks for no reply, two round trips less.
    pub envelope_noreply: bool,
}

impl Default for Features {
    /// What the rules implemented today need: envelope stages only.
    fn default() -> Self {
        Features {
            actions: ACTIONS,
            headers: false,
            body: false,
            helo: false,
            envelope_noreply: false,
        }
    }
}

/// The answer to the MTA's offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub actions: Actions,
    pub opts: ProtoOpts,
    pub macros: HashMap<MacroStage, CString>,
}

/// The MTA cannot do something this milter needs; the connection is refused and the MTA
/// applies its `milter_default_action`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the MTA does not offer the milter actions this build needs: {missing:?}")]
pub struct Unsupported {
    pub missing: Actions,
}

impl Features {
    /// What the DKIM signer (R6) needs on top: every header (to sign them and to know the
    /// From domain), the body (the body hash) and `ADD_HEADER` (to insert the signature).
    pub fn with_dkim(self) -> Features {
        Features {
            actions: self.actions | Actions::ADD_HEADER,
            headers: true,
            body: true,
            ..self
        }
    }

    /// What send-as (R8) needs on top: every header (the `From:` and `Sender:` fields) and
    /// the end of headers, where it decides. No body, no message modification.
    pub fn with_headers(self) -> Features {
        Features {
            headers: true,
            ..self
        }
    }

    /// What inbound verification (R7) needs on top: HELO (SPF checks the HELO name; the
    /// client address comes at MAIL), every header and the body (DKIM, DMARC, ARC), and the
    /// actions to add our `Authentication-Results` (`ADD_HEADER`) and to delete forged ones
    /// claiming our authserv-id (`CHANGE_HEADER`, an empty value deletes).
    pub fn with_verify(self) -> Features {
        Features {
            actions: self.actions | Actions::ADD_HEADER | Actions::CHANGE_HEADER,
            headers: true,
            body: true,
            helo: true,
            ..self
        }
    }

    /// What R13 at end of message needs on top: every header and the body, to measure the
    /// message (no reply asked for either). No message modification.
    pub fn with_sizes(self) -> Features {
        Features {
            headers: true,
            body: true,
            ..self
        }
    }

    /// MAIL and RCPT without reply: the policy service answers them.
    pub fn with_envelope_by_policy(self) -> Features {
        Features {
            envelope_noreply: true,
            ..self
        }
    }

    /// Answers the MTA's offer of actions and protocol options.
    ///
    /// indymilter starts `requested_actions` as everything the MTA offered; this assigns the
    /// exact set instead, so nothing is requested that is not used.
    pub fn negotiate(
        &self,
        mta_actions: Actions,
        mta_opts: ProtoOpts,
    ) -> Result<Negotiated, Unsupported> {
        if !mta_actions.contains(self.actions) {
            return Err(Unsupported {
                missing: self.actions - mta_actions,
            });
        }
        let mut actions = self.actions;
        // Sendmail honours per-stage macro lists only from milters that request this;
        // Postfix reads the lists either way.
        if mta_actions.contains(Actions::REQUEST_MACROS) {
            actions |= Actions::REQUEST_MACROS;
        }
        // DATA carries nothing a rule needs (the queue id is asked again at end of message,
        // which the MTA always sends), so it is never a stage of its own.
        // Nor is CONNECT: the client arrives as macros at MAIL.
        let mut skip = ProtoOpts::NO_UNKNOWN | ProtoOpts::NO_DATA | ProtoOpts::NO_CONNECT;
        if !self.helo {
            skip |= ProtoOpts::NO_HELO;
        }
        if !self.headers {
            skip |= ProtoOpts::NO_HEADER | ProtoOpts::NO_EOH;
        }
        if !self.body {
            skip |= ProtoOpts::NO_BODY;
        }
        // Ask to skip only what the MTA can skip; a stage it sends anyway is just ignored.
        let mut opts = skip & mta_opts;
        if self.headers {
            // Header values exactly as in the message, with the space after the colon (and
            // inserted headers are taken as given: the signer adds that space itself).
            // No reply per header: a verdict on the headers is given at end of headers, so
            // the MTA need not wait for one answer per header line.
            // Nor at end of headers: its verdict is given at end of message (Postfix gives
            // an end-of-headers refusal after the end of DATA anyway).
            opts |= (ProtoOpts::LEADING_SPACE | ProtoOpts::NOREPLY_HEADER | ProtoOpts::NOREPLY_EOH)
                & mta_opts;
        }
        if self.body {
            // Likewise per body chunk: body verdicts (signing failures) come at end of message.
            opts |= ProtoOpts::NOREPLY_BODY & mta_opts;
        }
        if self.helo {
            // HELO is only recorded (SPF's verdicts come at end of message): the MTA need
            // not wait for an answer.
            opts |= ProtoOpts::NOREPLY_HELO & mta_opts;
        }
        if !mta_opts.contains(ProtoOpts::NO_CONNECT) {
            // An MTA that sends CONNECT anyway need not wait for an answer to it either.
            opts |= ProtoOpts::NOREPLY_CONNECT & mta_opts;
        }
        if self.envelope_noreply {
            opts |= (ProtoOpts::NOREPLY_MAIL | ProtoOpts::NOREPLY_RCPT) & mta_opts;
        }
        Ok(Negotiated {
            actions,
            opts,
            macros: self.macros(),
        })
    }

    /// Macros requested per stage.
    ///
    /// Once a milter sends any list, Postfix replaces *all* its `milter_*_macros` defaults:
    /// stages not listed get no macros at all. So every stage read here is listed, and the
    /// queue id `i` is asked at every message stage (Postfix assigns it at MAIL, RCPT or DATA
    /// depending on `smtpd_delay_open_until_valid_rcpt`). Connect and HELO come before any
    /// queue id exists, so `i` is not asked there.
    fn macros(&self) -> HashMap<MacroStage, CString> {
        let mut m: HashMap<MacroStage, CString> = [
            (MacroStage::Connect, c"{client_addr} {client_name}"),
            (MacroStage::Helo, c"{tls_version}"),
            (
                MacroStage::Mail,
                c"i {auth_authen} {mail_addr} {tls_version} {client_addr} {client_name}",
            ),
            (MacroStage::Rcpt, c"i {rcpt_addr}"),
            (MacroStage::Data, c"i"),
            (MacroStage::Eom, c"i"),
        ]
        .into_iter()
        .map(|(stage, list)| (stage, list.to_owned()))
        .collect();
        if self.headers {
            m.insert(MacroStage::Eoh, c"i".to_owned());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Postfix 3.x offers (milter_protocol = 6).
    fn postfix_actions() -> Actions {
        Actions::all()
    }

    #[test]
    fn default_skips_every_stage_no_rule_needs_and_requests_no_modifications() {
        let n = Features::default()
            .negotiate(postfix_actions(), ProtoOpts::all())
            .unwrap();
        assert_eq!(n.actions, Actions::REQUEST_MACROS);
        assert_eq!(
            n.opts,
            ProtoOpts::NO_UNKNOWN
                | ProtoOpts::NO_DATA
                | ProtoOpts::NO_CONNECT
                | ProtoOpts::NO_HELO
                | ProtoOpts::NO_HEADER
                | ProtoOpts::NO_EOH
                | ProtoOpts::NO_BODY
        );
        // With CONNECT skipped, the client arrives as macros at MAIL.
        let mail = n.macros[&MacroStage::Mail].to_str().unwrap();
        assert!(
            mail.contains("{client_addr}") && mail.contains("{client_name}"),
            "{mail}"
        );
        assert!(!n.macros.contains_key(&MacroStage::Eoh));
    }

    #[test]
    fn the_helo_stage_when_a_rule_needs_it_never_connect() {
        let n = Features {
            helo: true,
            ..Features::default()
        }
        .negotiate(postfix_actions(), ProtoOpts::all())
        .unwrap();
        assert!(n.opts.contains(ProtoOpts::NO_CONNECT));
        assert!(!n.opts.contains(ProtoOpts::NO_HELO));
        // An MTA that cannot skip CONNECT sends it without waiting for an answer.
        let n = Features::default()
            .negotiate(postfix_actions(), ProtoOpts::all() - ProtoOpts::NO_CONNECT)
            .unwrap();
        assert!(!n.opts.contains(ProtoOpts::NO_CONNECT));
        assert!(n.opts.contains(ProtoOpts::NOREPLY_CONNECT));
    }

    #[test]
    fn every_message_stage_asks_for_the_queue_id() {
        let n = Features {
            headers: true,
            ..Features::default()
        }
        .negotiate(postfix_actions(), ProtoOpts::all())
        .unwrap();
        for stage in [
            MacroStage::Mail,
            MacroStage::Rcpt,
            MacroStage::Data,
            MacroStage::Eoh,
            MacroStage::Eom,
        ] {
            let list = n.macros[&stage].to_str().unwrap();
            assert!(list.split(' ').any(|m| m == "i"), "{stage:?}: {list}");
        }
        assert!(
            n.macros[&MacroStage::Mail]
                .to_str()
                .unwrap()
                .contains("{auth_authen}")
        );
        assert!(
            n.macros[&MacroStage::Helo]
                .to_str()
                .unwrap()
                .contains("{tls_version}")
        );
        assert!(!n.opts.contains(ProtoOpts::NO_HEADER));
    }

    #[test]
    fn body_switch_and_dkim_actions() {
        let dkim = Features {
            actions: Actions::ADD_HEADER,
            headers: true,
            body: true,
            helo: false,
            envelope_noreply: false,
        };
        let n = dkim.negotiate(postfix_actions(), ProtoOpts::all()).unwrap();
        assert_eq!(n.actions, Actions::ADD_HEADER | Actions::REQUEST_MACROS);
        assert_eq!(
            n.opts,
            ProtoOpts::NO_UNKNOWN
                | ProtoOpts::NO_DATA
                | ProtoOpts::NO_CONNECT
                | ProtoOpts::NO_HELO
                | ProtoOpts::LEADING_SPACE
                | ProtoOpts::NOREPLY_HEADER
                | ProtoOpts::NOREPLY_EOH
                | ProtoOpts::NOREPLY_BODY
        );
        assert_eq!(Features::default().with_dkim(), dkim);

        let err = dkim
            .negotiate(Actions::ADD_RCPT, ProtoOpts::all())
            .unwrap_err();
        assert_eq!(err.missing, Actions::ADD_HEADER);
    }

    #[test]
    fn send_as_asks_for_headers_only() {
        let n = Features::default()
            .with_headers()
            .negotiate(postfix_actions(), ProtoOpts::all())
            .unwrap();
        assert_eq!(n.actions, Actions::REQUEST_MACROS);
        assert_eq!(
            n.opts,
            ProtoOpts::NO_UNKNOWN
                | ProtoOpts::NO_DATA
                | ProtoOpts::NO_CONNECT
                | ProtoOpts::NO_HELO
                | ProtoOpts::NO_BODY
                | ProtoOpts::LEADING_SPACE
                | ProtoOpts::NOREPLY_HEADER
                | ProtoOpts::NOREPLY_EOH
        );
        assert!(n.macros.contains_key(&MacroStage::Eoh));
        // Signing needs more than that; both together are the signer's set.
        assert_eq!(
            Features::default().with_headers().with_dkim(),
            Features::default().with_dkim()
        );
    }

    #[test]
    fn verification_asks_for_helo_content_and_header_changes() {
        let n = Features::default()
            .with_verify()
            .negotiate(postfix_actions(), ProtoOpts::all())
            .unwrap();
        assert_eq!(
            n.actions,
            Actions::ADD_HEADER | Actions::CHANGE_HEADER | Actions::REQUEST_MACROS
        );
        for stage in [
            ProtoOpts::NO_HELO,
            ProtoOpts::NO_HEADER,
            ProtoOpts::NO_EOH,
            ProtoOpts::NO_BODY,
        ] {
            assert!(!n.opts.contains(stage), "{stage:?} skipped");
        }
        // The client address comes at MAIL: no CONNECT stage.
        assert!(n.opts.contains(ProtoOpts::NO_CONNECT));
        // HELO is only recorded: no reply asked where the MTA can do without.
        assert!(n.opts.contains(ProtoOpts::NOREPLY_HELO));
        let without = ProtoOpts::all() - ProtoOpts::NOREPLY_CONNECT - ProtoOpts::NOREPLY_HELO;
        let n = Features::default()
            .with_verify()
            .negotiate(postfix_actions(), without)
            .unwrap();
        assert!(
            !n.opts
                .intersects(ProtoOpts::NOREPLY_CONNECT | ProtoOpts::NOREPLY_HELO)
        );
        // Signing and verification together ask for the union.
        assert_eq!(
            Features::default().with_dkim().with_verify(),
            Features::default().with_verify()
        );
        let err = Features::default()
            .with_verify()
            .negotiate(Actions::ADD_HEADER, ProtoOpts::all())
            .unwrap_err();
        assert_eq!(err.missing, Actions::CHANGE_HEADER);
    }

    #[test]
    fn envelope_by_policy_asks_for_no_reply_at_mail_and_rcpt_when_offered() {
        let f = Features::default().with_headers().with_envelope_by_policy();
        let n = f.negotiate(postfix_actions(), ProtoOpts::all()).unwrap();
        assert!(
            n.opts
                .contains(ProtoOpts::NOREPLY_MAIL | ProtoOpts::NOREPLY_RCPT)
        );
        assert!(!n.opts.contains(ProtoOpts::NO_MAIL) && !n.opts.contains(ProtoOpts::NO_RCPT));
        let old = f
            .negotiate(
                postfix_actions(),
                ProtoOpts::all() - ProtoOpts::NOREPLY_MAIL - ProtoOpts::NOREPLY_RCPT,
            )
            .unwrap();
        assert!(
            !old.opts
                .intersects(ProtoOpts::NOREPLY_MAIL | ProtoOpts::NOREPLY_RCPT)
        );
        let checked = Features::default()
            .negotiate(postfix_actions(), ProtoOpts::all())
            .unwrap();
        assert!(
            !checked
                .opts
                .intersects(ProtoOpts::NOREPLY_MAIL | ProtoOpts::NOREPLY_RCPT)
        );
    }

    #[test]
    fn only_skips_what_the_mta_offers() {
        let n = Features::default()
            .negotiate(Actions::empty(), ProtoOpts::NO_BODY | ProtoOpts::NO_HEADER)
            .unwrap();
        assert_eq!(n.opts, ProtoOpts::NO_BODY | ProtoOpts::NO_HEADER);
        assert_eq!(n.actions, Actions::empty());
    }
}
