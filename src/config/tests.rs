use super::*;

#[test]
fn empty_file_gives_defaults() {
    let c = Config::from_toml("").unwrap();
    assert_eq!(c.server.milter_listen, "inet:127.0.0.1:8891");
    assert_eq!(c.rule(RuleId::R1).mode, Mode::Enforce);
    assert_eq!(c.rule(RuleId::R1).on_store_error, OnError::Tempfail);
}

#[test]
fn every_error_is_reported_with_its_key() {
    let errs = Config::from_toml(
        r#"
        [server]
        milter_listen = "127.0.0.1:8891"
        max_connections = 0
        [store]
        url = "postgres://x"
        [log]
        format = "xml"
        [rules.R77]
        mode = "monitor"
        "#,
    )
    .unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "server.milter_listen",
            "server.max_connections",
            "store.url",
            "log.format",
            "rules.R77"
        ]
    );
}

#[test]
fn unknown_key_names_the_key_and_line() {
    let errs = Config::from_toml("[server]\nmilter_lisen = \"inet:127.0.0.1:1\"\n").unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].key, "line 2");
    assert!(
        errs[0].reason.contains("milter_lisen"),
        "{}",
        errs[0].reason
    );
}

#[test]
fn duplicate_table_shows_the_offending_line() {
    let errs = Config::from_toml("[log]\nlevel = \"info\"\n[log]\nlevel = \"warn\"\n").unwrap_err();
    assert_eq!(errs[0].key, "line 3");
    assert!(errs[0].reason.contains("`[log]`"), "{}", errs[0].reason);
}

#[test]
fn rule_modes_and_durations_parse() {
    let c = Config::from_toml(
        r#"
        [server]
        shutdown_grace = "5s"
        policy_idle_timeout = 60
        [rules.R1]
        mode = "monitor"
        on_store_error = "accept"
        [rules.R9]
        mode = "off"
        "#,
    )
    .unwrap();
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(5));
    assert_eq!(c.server.policy_idle_timeout, Duration::from_secs(60));
    assert_eq!(c.rule(RuleId::R1).mode, Mode::Monitor);
    assert_eq!(c.rule(RuleId::R1).on_store_error, OnError::Accept);
    assert_eq!(c.rule(RuleId::R9).mode, Mode::Off);
    assert_eq!(c.rule(RuleId::R2).mode, Mode::Enforce);
}

#[test]
fn bad_duration_and_mode_are_explained() {
    let errs = Config::from_toml("[server]\nshutdown_grace = \"soon\"\n").unwrap_err();
    assert!(
        errs[0].reason.contains("not a duration"),
        "{}",
        errs[0].reason
    );
    let errs = Config::from_toml("[rules.R1]\nmode = \"strict\"\n").unwrap_err();
    assert!(errs[0].reason.contains("enforce"), "{}", errs[0].reason);
}

#[test]
fn short_tokens_and_missing_scopes_are_refused() {
    let errs = Config::from_toml(
        r#"
        [[admin.tokens]]
        name = "ops"
        token = "short"
        scopes = []
        "#,
    )
    .unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["admin.tokens[0].token", "admin.tokens[0].scopes"]);
}

#[test]
fn shipped_example_config_is_valid_and_matches_defaults() {
    let c = Config::from_toml(include_str!("../../config/mailwarden.toml")).unwrap();
    let d = Config::default();
    assert_eq!(c.server.milter_listen, d.server.milter_listen);
    assert_eq!(c.server.policy_listen, d.server.policy_listen);
    assert_eq!(c.server.policy_idle_timeout, d.server.policy_idle_timeout);
    assert_eq!(c.store.url, d.store.url);
    assert_eq!(c.store.timeout, d.store.timeout);
    assert_eq!(c.admin.listen, d.admin.listen);
    assert_eq!(
        c.directory.local_part_max_len,
        d.directory.local_part_max_len
    );
    for r in KNOWN_RULES {
        assert!(
            c.rules.contains_key(r.as_str()),
            "example documents rule {r}"
        );
    }
}

#[test]
fn shipped_quickstart_config_is_valid() {
    let c = Config::from_toml(include_str!("../../config/quickstart.toml")).unwrap();
    assert_eq!(c.store.url, "sqlite:var/mailwarden.db");
    assert_eq!(c.token_secrets().len(), 1);
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/dkim/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn dkim_section_parses_and_loads_keys() {
    let c = Config::from_toml(&format!(
        r#"
        [dkim]
        expiration = "14d"
        internal_networks = ["192.0.2.0/24", "2001:db8::/32"]
        [[dkim.keys]]
        domain = "mpt.gov.la"
        selector = "rsa2026"
        algorithm = "rsa-sha256"
        key_file = "{}"
        [[dkim.keys]]
        domain = "mpt.gov.la"
        selector = "ed2026"
        algorithm = "ed25519-sha256"
        key_file = "{}"
        "#,
        fixture("rsa2048-pkcs1.pem"),
        fixture("ed25519-pkcs8v1.pem")
    ))
    .unwrap();
    assert!(c.dkim.enabled());
    assert_eq!(c.dkim.keyring.keys().len(), 2);
    assert_eq!(c.dkim.expiration, Some(Duration::from_secs(14 * 86400)));
    assert!(c.dkim.is_internal(Some("192.0.2.99".parse().unwrap())));
    assert!(
        c.dkim
            .is_internal(Some("::ffff:192.0.2.1".parse().unwrap()))
    );
    assert!(c.dkim.is_internal(Some("2001:db8::25".parse().unwrap())));
    assert!(!c.dkim.is_internal(Some("198.51.100.1".parse().unwrap())));
    assert!(!c.dkim.is_internal(None));
    // From is signed and over-signed by default.
    let h = c.dkim.signed_header_list();
    assert_eq!(h.iter().filter(|n| *n == "From").count(), 2);
    assert!(!Config::from_toml("").unwrap().dkim.enabled());
}

#[test]
fn dkim_errors_are_all_reported_with_their_keys() {
    let errs = Config::from_toml(&format!(
        r#"
        [dkim]
        sign_headers = ["Subject", "Bad Name"]
        oversign_headers = ["To"]
        expiration = "10m"
        [[dkim.keys]]
        domain = "not_a_domain"
        selector = "-bad"
        algorithm = "rsa-sha256"
        key_file = "{rsa}"
        [[dkim.keys]]
        domain = "mpt.gov.la"
        selector = "s"
        algorithm = "ed25519-sha256"
        key_file = "{rsa}"
        [[dkim.keys]]
        domain = "mpt.gov.la"
        selector = "s"
        algorithm = "rsa-sha256"
        key_file = "{short}"
        "#,
        rsa = fixture("rsa2048-pkcs1.pem"),
        short = fixture("rsa1024-pkcs8.pem")
    ))
    .unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "dkim.sign_headers",
            "dkim.sign_headers",
            "dkim.oversign_headers",
            "dkim.expiration",
            "dkim.keys[0].domain",
            "dkim.keys[0].selector",
            "dkim.keys[2].selector",
            "dkim.keys[1].key_file",
            "dkim.keys[2].key_file",
        ],
        "{errs:#?}"
    );
    assert!(errs[0].reason.contains("must include From"));
    assert!(errs[6].reason.contains("configured twice"));
}

#[test]
fn dkim_bad_algorithm_and_network_name_the_line() {
    let errs = Config::from_toml("[dkim]\ninternal_networks = [\"10.0.0.0/33\"]\n").unwrap_err();
    assert_eq!(errs[0].key, "line 2", "{errs:?}");
    let errs = Config::from_toml(
        "[[dkim.keys]]\ndomain = \"mpt.gov.la\"\nselector = \"s\"\nalgorithm = \"rsa-sha1\"\nkey_file = \"k\"\n",
    )
    .unwrap_err();
    assert_eq!(errs[0].key, "line 4", "{errs:?}");
    assert!(errs[0].reason.contains("rsa-sha256"), "{}", errs[0].reason);
}

#[test]
fn sending_limit_keys_belong_to_r14_and_the_example_matches_the_defaults() {
    let errs = Config::from_toml(
        "[rules.R1]\nmessages_per_hour = 5\n[rules.R14]\ncount_on = \"sometimes\"\n",
    )
    .unwrap_err();
    // A bad value fails parsing, which names the line and the key.
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "line 4", "{errs:?}");
    assert!(errs[0].reason.contains("count_on"), "{errs:?}");
    let errs = Config::from_toml("[rules.R1]\nmessages_per_hour = 5\n").unwrap_err();
    assert_eq!(errs[0].key, "rules.R1.messages_per_hour", "{errs:?}");
    assert!(errs[0].reason.contains("[rules.R14]"), "{errs:?}");

    let c = Config::from_toml(include_str!("../../config/mailwarden.toml")).unwrap();
    let shipped = crate::engine::rules::limits::Limits::from_rule(&c.rule(RuleId::R14));
    assert_eq!(shipped, crate::engine::rules::limits::Limits::DEFAULT);
    assert_eq!(c.rule(RuleId::R14).count_on, Some(CountOn::Auto));
}

#[test]
fn login_domain_belongs_to_r8_and_must_be_a_domain() {
    let c = Config::from_toml("[rules.R8]\nlogin_domain = \"MPT.gov.la.\"\n").unwrap();
    assert_eq!(c.login_domain().as_deref(), Some("mpt.gov.la"));
    assert_eq!(Config::default().login_domain(), None);
    let errs = Config::from_toml(
        "[rules.R8]\nlogin_domain = \"champa@mpt.gov.la\"\n[rules.R9]\nlogin_domain = \"mpt.gov.la\"\n",
    )
    .unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["rules.R8.login_domain", "rules.R9.login_domain"]);
    assert!(errs[0].reason.contains("is not a domain name"), "{errs:?}");
    assert!(errs[1].reason.contains("belongs in [rules.R8]"), "{errs:?}");
    let errs = Config::from_toml("[rules.R8]\nlogin_domain = \"\"\n").unwrap_err();
    assert_eq!(errs[0].key, "rules.R8.login_domain");
}

#[test]
fn r7_is_off_until_its_table_exists_and_its_keys_stay_in_it() {
    assert_eq!(
        Config::default().rule(RuleId::R7).mode,
        crate::model::Mode::Off
    );
    let c = Config::from_toml("[rules.R7]\n").unwrap();
    assert_eq!(c.rule(RuleId::R7).mode, crate::model::Mode::Enforce);
    let errs = Config::from_toml(
        "[rules.R1]\nauthserv_id = \"mx.example\"\non_dns_error = \"accept\"\n\
         [rules.R7]\nauthserv_id = \"not a host\"\nmax_message_size = 0\n\
         [dns]\nnameservers = [\"127.0.0.1:5353\", \"resolver\"]\n",
    )
    .unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "dns.nameservers[1]",
            "rules.R1.authserv_id",
            "rules.R1.on_dns_error",
            "rules.R7.authserv_id",
            "rules.R7.max_message_size"
        ]
    );
}

#[test]
fn quota_keys_belong_to_r13_and_count_on_to_the_counting_rules() {
    let c = Config::from_toml(
        "[rules.R13]\ncount_deliveries = false\ncount_on = \"milter\"\npermanent = true\n",
    )
    .unwrap();
    let r13 = c.rule(RuleId::R13);
    assert_eq!(r13.count_deliveries, Some(false));
    assert_eq!(r13.count_on, Some(CountOn::Milter));
    let errs = Config::from_toml("[rules.R14]\ncount_deliveries = true\n").unwrap_err();
    assert_eq!(errs[0].key, "rules.R14.count_deliveries", "{errs:?}");
    assert!(errs[0].reason.contains("[rules.R13]"), "{errs:?}");
    let errs = Config::from_toml("[rules.R1]\ncount_on = \"policy\"\n").unwrap_err();
    assert_eq!(errs[0].key, "rules.R1.count_on", "{errs:?}");
    let errs = Config::from_toml("[rules.R13]\ncount_deliveries = \"yes\"\n").unwrap_err();
    assert!(errs[0].reason.contains("count_deliveries"), "{errs:?}");
}

/// Counting on a front-end the daemon does not serve would count nothing: refused, naming
/// the key.
#[test]
fn count_on_must_name_a_served_front_end() {
    let errs =
        Config::from_toml("[server]\npolicy_listen = \"\"\n[rules.R14]\ncount_on = \"policy\"\n")
            .unwrap_err();
    assert_eq!(errs[0].key, "rules.R14.count_on", "{errs:?}");
    assert!(
        errs[0].reason.contains("server.policy_listen is empty"),
        "{errs:?}"
    );
    let errs =
        Config::from_toml("[server]\nmilter_listen = \"\"\n[rules.R13]\ncount_on = \"milter\"\n")
            .unwrap_err();
    assert_eq!(errs[0].key, "rules.R13.count_on", "{errs:?}");
    // "auto" with one front-end, and a served front-end named: fine.
    for toml in [
        "[server]\npolicy_listen = \"\"\n[rules.R14]\ncount_on = \"auto\"\n",
        "[server]\npolicy_listen = \"\"\n[rules.R14]\ncount_on = \"milter\"\n",
        "[server]\nmilter_listen = \"\"\n[rules.R13]\ncount_on = \"policy\"\n",
    ] {
        assert!(Config::from_toml(toml).is_ok(), "{toml}");
    }
}

#[test]
fn organisation_limits_belong_to_r14_and_are_off_by_default() {
    let c = Config::from_toml("").unwrap();
    assert_eq!(c.rule(RuleId::R14).org_messages_per_hour, None);
    let c = Config::from_toml("[rules.R14]\norg_recipients_per_day = 5000\n").unwrap();
    assert_eq!(c.rule(RuleId::R14).org_recipients_per_day, Some(5000));
    let errs = Config::from_toml("[rules.R13]\norg_messages_per_hour = 5\n").unwrap_err();
    assert_eq!(errs[0].key, "rules.R13.org_messages_per_hour", "{errs:?}");
    assert!(errs[0].reason.contains("[rules.R14]"), "{errs:?}");
    let errs = Config::from_toml("[rules.R14]\norg_messages_per_day = -1\n").unwrap_err();
    assert!(errs[0].reason.contains("org_messages_per_day"), "{errs:?}");
}

#[test]
fn r15_thresholds_belong_to_r15_and_activity_keys_are_checked() {
    let errs = Config::from_toml(
        "[rules.R14]\nburst_floor = 5\n[rules.R15]\nreject_share = 150\nbaseline_hours = 0\n\
         [activity]\nauto_withdraw_after = \"730s\"\nwrite_interval = \"0s\"\n",
    )
    .unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "rules.R14.burst_floor",
        "rules.R15.reject_share",
        "rules.R15.baseline_hours",
        "activity.auto_withdraw_after",
        "activity.write_interval",
    ] {
        assert!(keys.contains(&key), "{key} not named: {errs:?}");
    }
    let errs = Config::from_toml("[activity]\nauto_withdraw_after = \"two years\"\n").unwrap_err();
    assert!(errs[0].reason.contains("auto_withdraw_after"), "{errs:?}");

    let c = Config::from_toml(include_str!("../../config/mailwarden.toml")).unwrap();
    let shipped = crate::engine::rules::compromise::watch(&c.rule(RuleId::R15));
    assert_eq!(shipped, crate::store::Watch::DEFAULT);
    assert_eq!(c.activity.auto_withdraw_after, None);
    assert_eq!(
        c.activity.write_interval,
        ActivityConfig::default().write_interval
    );
    let on = Config::from_toml("[activity]\nauto_withdraw_after = \"730d\"\n").unwrap();
    assert_eq!(
        on.activity.auto_withdraw_after,
        Some(Duration::from_secs(730 * 86_400))
    );
}

#[test]
fn socket_mode_is_octal_and_named_when_bad() {
    let c = Config::from_toml("[server]\nsocket_mode = \"0666\"\n").unwrap();
    assert_eq!(c.server.socket_mode(), Ok(0o666));
    assert_eq!(Config::default().server.socket_mode(), Ok(0o660));
    for bad in ["0999", "rw-rw----", "1777", ""] {
        let errs = Config::from_toml(&format!("[server]\nsocket_mode = \"{bad}\"\n")).unwrap_err();
        assert_eq!(errs[0].key, "server.socket_mode", "{bad}: {errs:?}");
    }
}

#[test]
fn milter_envelope_left_to_policy_needs_the_policy_listener() {
    assert_eq!(
        Config::default().server.milter_envelope,
        crate::config::MilterEnvelope::Check
    );
    let c = Config::from_toml("[server]\nmilter_envelope = \"policy\"\n").unwrap();
    assert_eq!(
        c.server.milter_envelope,
        crate::config::MilterEnvelope::Policy
    );
    let errs = Config::from_toml("[server]\nmilter_envelope = \"policy\"\npolicy_listen = \"\"\n")
        .unwrap_err();
    assert_eq!(errs[0].key, "server.milter_envelope", "{errs:?}");
    assert!(errs[0].reason.contains("policy_listen"), "{errs:?}");
    let errs = Config::from_toml("[server]\nmilter_envelope = \"maybe\"\n").unwrap_err();
    // A value serde refuses is reported with its line, naming the key and the choices.
    assert!(
        errs[0].reason.contains("milter_envelope") && errs[0].reason.contains("`policy`"),
        "{errs:?}"
    );
}

#[test]
fn an_automatic_runtime_leaves_half_the_cpus_to_the_mta() {
    let auto = Config::default().server;
    assert_eq!(auto.worker_threads, 0);
    assert_eq!(
        [1, 2, 3, 4, 16].map(|cpus| auto.runtime_workers(cpus)),
        [1, 1, 1, 2, 8]
    );
    let fixed = Config::from_toml("[server]\nworker_threads = 3\n")
        .unwrap()
        .server;
    assert_eq!(fixed.runtime_workers(16), 3);
    assert_eq!(fixed.runtime_workers(1), 3);
}

/// The fields serde accepts in the table `header` (e.g. `[server]`, `[[admin.tokens]]`): the
/// "expected one of" list of the error a field nobody has gives.
fn fields_of(header: &str) -> Vec<String> {
    let errs = Config::from_toml(&format!("{header}\nzz_no_such_key = 1\n")).unwrap_err();
    let reason = &errs[0].reason;
    let list = reason
        .split_once("expected one of ")
        .or_else(|| reason.split_once("expected "))
        .unwrap_or_else(|| panic!("{header}: {reason}"))
        .1;
    list.split(", ")
        .filter_map(|f| f.split('`').nth(1))
        .map(str::to_owned)
        .collect()
}

/// The example's text between `header` (also commented out, `# [[admin.tokens]]`) and the
/// next table header.
fn example_section(header: &str) -> String {
    let example = include_str!("../../config/mailwarden.toml");
    let start = example
        .lines()
        .position(|l| l.trim_start_matches("# ").trim() == header)
        .unwrap_or_else(|| panic!("the example has no {header} section"));
    example
        .lines()
        .skip(start + 1)
        .take_while(|l| !l.starts_with('['))
        .collect::<Vec<_>>()
        .join("\n")
}

/// "`config/mailwarden.toml` with every key commented": each key of every table the daemon
/// reads is written in the example's section for it (for rule keys: in some `[rules.*]`
/// section), set or commented out, so an operator finds it there.
#[test]
fn the_example_config_shows_every_key() {
    let mut missing = Vec::new();
    for header in [
        "[server]",
        "[store]",
        "[directory]",
        "[admin]",
        "[[admin.tokens]]",
        "[log]",
        "[dkim]",
        "[[dkim.keys]]",
        "[alerts]",
        "[dns]",
        "[activity]",
    ] {
        let fields = fields_of(header);
        assert!(!fields.is_empty(), "{header}");
        let text = example_section(header);
        for field in fields {
            let shown = text.lines().any(|l| {
                let l = l.trim_start_matches('#').trim_start();
                l.starts_with(&format!("{field} =")) || l.starts_with(&format!("{field}="))
            });
            // Sub-tables are shown by their own header.
            let table = text.contains(&format!(
                "[{header_name}.{field}]",
                header_name = header.trim_matches(['[', ']'])
            )) || text
                .contains(&format!("[[{}.{field}]]", header.trim_matches(['[', ']'])));
            if !shown && !table {
                missing.push(format!("{header} {field}"));
            }
        }
    }
    // The rule tables share one set of fields, each rule validating its own: every field is
    // shown under some [rules.*] section.
    let example = include_str!("../../config/mailwarden.toml");
    let rules = &example[example.find("[rules.").expect("rule sections")..];
    for field in fields_of("[rules.R1]") {
        let shown = rules.lines().any(|l| {
            let l = l.trim_start_matches('#').trim_start();
            l.starts_with(&format!("{field} ="))
        });
        if !shown {
            missing.push(format!("[rules.*] {field}"));
        }
    }
    assert!(
        missing.is_empty(),
        "not in config/mailwarden.toml: {missing:?}"
    );
}

#[test]
fn recipient_delimiter_takes_characters_that_can_start_an_extension() {
    assert_eq!(Config::default().directory.recipient_delimiter, "+");
    let c = Config::from_toml("[directory]\nrecipient_delimiter = \"+-\"\n").unwrap();
    assert_eq!(c.directory.recipient_delimiter, "+-");
    assert!(Config::from_toml("[directory]\nrecipient_delimiter = \"\"\n").is_ok());
    for bad in ["@", "+ ", "\\\""] {
        let errs = Config::from_toml(&format!("[directory]\nrecipient_delimiter = \"{bad}\"\n"))
            .unwrap_err();
        assert_eq!(
            errs[0].key, "directory.recipient_delimiter",
            "{bad:?}: {errs:?}"
        );
    }
}
