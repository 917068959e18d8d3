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
