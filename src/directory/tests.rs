use super::*;

fn rules() -> Rules {
    Rules::default()
}

#[test]
fn org_code_is_one_to_five_letters_lower_cased() {
    let r = rules();
    assert_eq!(r.org_code("MPT").unwrap(), "mpt");
    assert_eq!(r.org_code("a").unwrap(), "a");
    assert_eq!(r.org_code("abcde").unwrap(), "abcde");
    for bad in ["", "abcdef", "mp1", "m-t", "mpt.", "ມ"] {
        let e = r.org_code(bad).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("R3 (Art. 8.2)"), "{bad:?}: {msg}");
        assert!(msg.contains("1 to 5 ASCII letters"), "{bad:?}: {msg}");
    }
    assert!(
        r.org_code("abcdef")
            .unwrap_err()
            .to_string()
            .contains("it has 6 letters")
    );
}

#[test]
fn org_code_limit_follows_config() {
    let r = Rules {
        org_code_max_len: 7,
        ..rules()
    };
    assert_eq!(r.org_code("abcdefg").unwrap(), "abcdefg");
    assert!(r.org_code("abcdefgh").is_err());
}

#[test]
fn org_domain_defaults_under_base_domain() {
    let r = rules();
    assert_eq!(r.org_domain("mpt", None).unwrap(), "mpt.gov.la");
    assert_eq!(r.org_domain("mpt", Some("")).unwrap(), "mpt.gov.la");
    assert_eq!(
        r.org_domain("mpt", Some("Mail.MPT.gov.la.")).unwrap(),
        "mail.mpt.gov.la"
    );
    assert!(r.org_domain("mpt", Some("localhost")).is_err());
    assert!(r.org_domain("mpt", Some("a..la")).is_err());
    assert!(r.org_domain("mpt", Some("-a.la")).is_err());
    assert!(r.org_domain("mpt", Some("a b.la")).is_err());
}

#[test]
fn local_part_accepts_the_allowed_shapes() {
    let r = rules();
    for (input, norm) in [
        ("champa", "champa"),
        ("Champa", "champa"),
        ("DG-Cabinet", "dg-cabinet"),
        ("champa.s", "champa.s"),
        ("a_b-c.d9", "a_b-c.d9"),
        ("x", "x"),
        ("abcdefghijklmn", "abcdefghijklmn"),
    ] {
        assert_eq!(r.local_part(input).unwrap(), norm, "{input}");
    }
}

#[test]
fn local_part_errors_name_r3_and_the_problem() {
    let r = rules();
    for (input, problem) in [
        ("", "it is empty"),
        ("abcdefghijklmno", "it has 15 characters"),
        ("x..y", "two dots in a row"),
        (".champa", "starts or ends with a dot"),
        ("champa.", "starts or ends with a dot"),
        ("1champa", "does not start with a letter"),
        ("_champa", "does not start with a letter"),
        ("cham pa", "' ' is not allowed"),
        ("champa+x", "'+' is not allowed"),
        ("ຈໍາປາ", "is not allowed"),
    ] {
        let msg = r.local_part(input).unwrap_err().to_string();
        assert!(msg.contains("R3 (Art. 8.3)"), "{input:?}: {msg}");
        assert!(msg.contains(problem), "{input:?}: {msg}");
        assert!(msg.contains(&format!("{input:?}")), "{input:?}: {msg}");
    }
}

#[test]
fn local_part_limit_follows_config() {
    let r = Rules {
        local_part_max_len: 3,
        ..rules()
    };
    assert!(r.local_part("abc").is_ok());
    assert!(
        r.local_part("abcd")
            .unwrap_err()
            .to_string()
            .contains("1 to 3 characters")
    );
}

#[test]
fn address_validates_both_halves() {
    let r = rules();
    assert_eq!(
        r.address(" Champa@MPT.gov.la ").unwrap().to_string(),
        "champa@mpt.gov.la"
    );
    assert!(
        r.address("champa")
            .unwrap_err()
            .to_string()
            .contains("no '@'")
    );
    assert!(
        r.address("x..y@mpt.gov.la")
            .unwrap_err()
            .to_string()
            .contains("R3")
    );
    assert!(matches!(
        r.address("champa@mpt..la"),
        Err(RegistrationError::Domain { .. })
    ));
}

#[test]
fn kinds_and_initial_status() {
    assert_eq!(account_kind("Unit").unwrap(), AccountKind::Unit);
    assert_eq!(account_kind("position").unwrap(), AccountKind::Position);
    assert_eq!(account_kind("person").unwrap(), AccountKind::Person);
    let msg = account_kind("boss").unwrap_err().to_string();
    assert!(
        msg.contains("R5") && msg.contains("unit, position or person"),
        "{msg}"
    );

    assert_eq!(initial_status(None).unwrap(), AccountStatus::Active);
    assert_eq!(
        initial_status(Some("pending")).unwrap(),
        AccountStatus::Pending
    );
    assert!(initial_status(Some("suspended")).is_err());
    assert!(initial_status(Some("withdrawn")).is_err());
}

#[test]
fn text_fields_are_bounded_and_single_line() {
    assert_eq!(
        text("name", Some("  Champa  ")).unwrap().as_deref(),
        Some("Champa")
    );
    assert_eq!(text("name", Some("   ")).unwrap(), None);
    assert!(text("name", Some("a\nb")).is_err());
    assert!(text("reason", Some(&"x".repeat(MAX_TEXT_LEN + 1))).is_err());
}

#[test]
fn suggestions_for_a_person_start_with_the_surname_initial() {
    let r = rules();
    let s = r.suggestions(
        "champa",
        &Holder {
            name: Some("Champa Souksavanh"),
            kind: Some(AccountKind::Person),
            org: Some("mpt"),
        },
    );
    assert_eq!(
        &s[..6],
        [
            "champa.s",
            "champa_s",
            "champa-s",
            "champa2",
            "champa-mpt",
            "champa.mpt"
        ]
    );
    assert_eq!(s[6], "champa3");
    assert_eq!(s.last().unwrap(), "champa99");
}

#[test]
fn suggestions_for_a_position_start_with_the_organisation() {
    let r = rules();
    let s = r.suggestions(
        "dg-cabinet",
        &Holder {
            name: None,
            kind: Some(AccountKind::Position),
            org: Some("MPT"),
        },
    );
    // "dg-cabinet-mpt" has 14 characters: fits exactly.
    assert_eq!(&s[..3], ["dg-cabinet-mpt", "dg-cabinet.mpt", "dg-cabinet2"]);
}

#[test]
fn suggestions_without_hints_are_numbered() {
    let s = rules().suggestions("champa", &Holder::default());
    assert_eq!(&s[..3], ["champa2", "champa3", "champa4"]);
}

#[test]
fn suggestions_fit_the_limit_and_all_pass_r3() {
    let r = rules();
    let holder = Holder {
        name: Some("Somchai Phommachanh"),
        kind: Some(AccountKind::Person),
        org: Some("mofa"),
    };
    for wanted in ["abcdefghijklmn", "dg-", "a", "ab.cd", "x_________y"] {
        let s = r.suggestions(wanted, &holder);
        assert!(!s.is_empty(), "{wanted}");
        for c in &s {
            assert!(r.local_part(c).is_ok(), "{wanted} -> {c}");
            assert_ne!(c, wanted);
        }
        let mut dedup = s.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), s.len(), "duplicates for {wanted}: {s:?}");
    }
    // A 14-character name is shortened to make room: never a trailing separator before it.
    let s = r.suggestions("abcdefghijklmn", &holder);
    assert_eq!(
        &s[..4],
        [
            "abcdefghijkl.p",
            "abcdefghijkl_p",
            "abcdefghijkl-p",
            "abcdefghijklm2"
        ]
    );
    let s = r.suggestions("dg-abcdefghijk", &Holder::default());
    assert_eq!(s[0], "dg-abcdefghij2");
}

#[test]
fn suggestions_are_deterministic() {
    let r = rules();
    let h = Holder {
        name: Some("Champa S"),
        kind: None,
        org: Some("mpt"),
    };
    assert_eq!(r.suggestions("champa", &h), r.suggestions("champa", &h));
}

#[test]
fn non_latin_names_give_no_initial() {
    let s = rules().suggestions(
        "champa",
        &Holder {
            name: Some("ຈໍາປາ ສຸກສະຫວັນ"),
            kind: Some(AccountKind::Person),
            org: None,
        },
    );
    assert_eq!(s[0], "champa2");
}
