//! The admin API over HTTP: auth, every endpoint, R3/R4/R5 errors, audit, cache invalidation,
//! metrics, TLS.

mod common;

use common::{ADMIN, Api, READ, WRITE};
use mailwarden::model::{Action, Address, Protocol, Transaction};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

fn user(address: &str, kind: &str) -> Value {
    json!({"address": address, "kind": kind})
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401_with_a_challenge() {
    let api = Api::start().await;
    let resp = api
        .http
        .get(format!("{}/v1/orgs", api.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let challenge = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer")
    );

    let resp = api
        .http
        .get(format!("{}/v1/orgs", api.url))
        .bearer_auth("not-a-configured-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );

    // A prefix of a real token is not a token.
    let (s, _) = api.get("/v1/orgs", &READ[..10]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let resp = api
        .http
        .get(format!("{}/v1/orgs", api.url))
        .basic_auth("registrar", Some(WRITE))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    api.stop().await;
}

#[tokio::test]
async fn scopes_are_ordered_read_write_admin_and_403_names_the_missing_one() {
    let api = Api::start().await;
    let (s, b) = api
        .post("/v1/orgs", READ, json!({"code": "mpt", "name": "MPT"}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(b["missing_scope"], "write");
    assert!(b["error"].as_str().unwrap().contains("auditor"), "{b}");
    assert!(
        api.audit().is_empty(),
        "a refused request writes no audit line"
    );

    // write includes read
    let (s, _) = api.get("/v1/orgs", WRITE).await;
    assert_eq!(s, StatusCode::OK);
    api.mpt().await;
    let (s, _) = api
        .post("/v1/users", WRITE, user("champa@mpt.gov.la", "person"))
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // withdraw and cease need admin
    let (s, b) = api
        .post(
            "/v1/users/champa@mpt.gov.la/withdraw",
            WRITE,
            json!({"reason": "left", "confirm": "champa@mpt.gov.la"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(b["missing_scope"], "admin");
    let (s, b) = api
        .post(
            "/v1/orgs/mpt/cease",
            WRITE,
            json!({"reason": "merged", "confirm": "mpt"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(b["missing_scope"], "admin");
    // suspend needs write: read is not enough, admin is
    let (s, b) = api
        .post(
            "/v1/users/champa@mpt.gov.la/suspend",
            READ,
            json!({"reason": "x"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(b["missing_scope"], "write");
    let (s, _) = api
        .post(
            "/v1/users/champa@mpt.gov.la/suspend",
            ADMIN,
            json!({"reason": "x"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    api.stop().await;
}

#[tokio::test]
async fn a_reload_changes_the_accepted_tokens() {
    let api = Api::start().await;
    let (s, _) = api.get("/v1/orgs", READ).await;
    assert_eq!(s, StatusCode::OK);
    let mut cfg = api.checker.snapshot().config.clone();
    cfg.admin.tokens.retain(|t| t.name != "auditor");
    api.checker.replace_config(cfg);
    let (s, _) = api.get("/v1/orgs", READ).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api.get("/v1/orgs", WRITE).await;
    assert_eq!(s, StatusCode::OK);
    api.stop().await;
}

#[tokio::test]
async fn organisations_register_show_list_and_cease() {
    let api = Api::start().await;
    let (s, b) = api
        .post(
            "/v1/orgs",
            WRITE,
            json!({"code": "MPT", "name": " Ministry of Posts "}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["code"], "mpt");
    assert_eq!(b["domain"], "mpt.gov.la");
    assert_eq!(b["name"], "Ministry of Posts");
    assert_eq!(b["status"], "active");
    assert!(chrono::DateTime::parse_from_rfc3339(b["created_at"].as_str().unwrap()).is_ok());

    let (s, b) = api
        .post(
            "/v1/orgs",
            WRITE,
            json!({"code": "mofa", "name": "Foreign Affairs", "domain": "MOFA.gov.la"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["domain"], "mofa.gov.la");

    // R3: too long, not letters
    for code in ["ministry", "mp3", ""] {
        let (s, b) = api
            .post("/v1/orgs", WRITE, json!({"code": code, "name": "X"}))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{code}: {b}");
        assert_eq!(b["rule"], "R3");
        assert!(
            b["error"].as_str().unwrap().contains("R3 (Art. 8.2)"),
            "{b}"
        );
    }
    // R4: taken, also in another case
    let (s, b) = api
        .post("/v1/orgs", WRITE, json!({"code": "Mpt", "name": "Again"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(b["rule"], "R4");

    let (s, b) = api.get("/v1/orgs/MPT", READ).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["code"], "mpt");
    let (s, b) = api.get("/v1/orgs/nope", READ).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(b["error"].as_str().unwrap().contains("not registered"));

    let (s, b) = api.get("/v1/orgs", READ).await;
    assert_eq!(s, StatusCode::OK);
    let codes: Vec<&str> = b["orgs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["mofa", "mpt"]);

    // Cease: reason and confirmation required.
    let (s, b) = api
        .post("/v1/orgs/mpt/cease", ADMIN, json!({"confirm": "mpt"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["error"].as_str().unwrap().contains("reason"), "{b}");
    let (s, b) = api
        .post("/v1/orgs/mpt/cease", ADMIN, json!({"reason": "merged"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["confirm_required"], "mpt");
    let (s, b) = api
        .post(
            "/v1/orgs/mpt/cease",
            ADMIN,
            json!({"reason": "merged", "confirm": "mofa"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(api.get("/v1/orgs/mpt", READ).await.1["status"], "active");

    let (s, b) = api
        .post(
            "/v1/orgs/mpt/cease",
            ADMIN,
            json!({"reason": "merged", "confirm": "mpt"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "ceased");
    assert_eq!(b["status_reason"], "merged");
    let (s, _) = api
        .post(
            "/v1/orgs/mpt/cease",
            ADMIN,
            json!({"reason": "again", "confirm": "mpt"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    // A ceased organisation takes no new accounts.
    let (s, b) = api
        .post("/v1/users", WRITE, user("champa@mpt.gov.la", "person"))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(b["error"].as_str().unwrap().contains("ceased"));
    api.stop().await;
}

#[tokio::test]
async fn accounts_register_with_r3_r5_validation() {
    let api = Api::start().await;
    api.mpt().await;
    let (s, b) = api
        .post(
            "/v1/users",
            WRITE,
            json!({"address": "Champa@MPT.gov.la", "kind": "person", "name": "Champa Souksavanh", "status": "pending"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["address"], "champa@mpt.gov.la");
    assert_eq!(b["org"], "mpt");
    assert_eq!(b["kind"], "person");
    assert_eq!(b["status"], "pending");
    assert_eq!(b["name"], "Champa Souksavanh");

    let (s, b) = api
        .post("/v1/users", WRITE, user("cabinet@mpt.gov.la", "unit"))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(b["status"], "active", "active is the default");

    for bad in [
        "x..y@mpt.gov.la",
        "1abc@mpt.gov.la",
        "abcdefghijklmno@mpt.gov.la",
        "a+b@mpt.gov.la",
    ] {
        let (s, b) = api.post("/v1/users", WRITE, user(bad, "person")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {b}");
        assert_eq!(b["rule"], "R3");
        let e = b["error"].as_str().unwrap();
        assert!(
            e.contains("R3 (Art. 8.3)") && e.contains("local part"),
            "{e}"
        );
    }
    let (s, b) = api
        .post("/v1/users", WRITE, user("boss@mpt.gov.la", "boss"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["rule"], "R5");
    let (s, b) = api
        .post(
            "/v1/users",
            WRITE,
            json!({"address": "dg@mpt.gov.la", "kind": "position", "status": "suspended"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["error"].as_str().unwrap().contains("pending or active"));
    let (s, b) = api
        .post("/v1/users", WRITE, user("someone@nowhere.la", "person"))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("register the organisation first")
    );

    let (s, b) = api.get("/v1/users/CHAMPA@mpt.gov.la", READ).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["kind"], "person");
    let (s, _) = api.get("/v1/users/nobody@mpt.gov.la", READ).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api.get("/v1/users/not-an-address", READ).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    api.stop().await;
}

#[tokio::test]
async fn a_taken_name_is_refused_with_free_suggestions() {
    let api = Api::start().await;
    api.mpt().await;
    for a in ["champa@mpt.gov.la", "champa.s@mpt.gov.la"] {
        let (s, _) = api.post("/v1/users", WRITE, user(a, "person")).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let audit_before = api.audit().len();
    let (s, b) = api
        .post(
            "/v1/users",
            WRITE,
            json!({"address": "CHAMPA@mpt.gov.la", "kind": "person", "name": "Champa Souksavanh"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(b["rule"], "R4");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("first come, first served")
    );
    // champa.s is taken, so it is skipped; three (directory.suggestions) free ones follow.
    assert_eq!(
        b["suggestions"],
        json!([
            "champa_s@mpt.gov.la",
            "champa-s@mpt.gov.la",
            "champa2@mpt.gov.la"
        ])
    );
    assert_eq!(
        api.audit().len(),
        audit_before,
        "no audit line for a refusal"
    );
    api.stop().await;
}

#[tokio::test]
async fn racing_registrations_of_one_name_give_exactly_one_201() {
    let api = std::sync::Arc::new(Api::start().await);
    api.mpt().await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let api = api.clone();
        // Different case on purpose: the same name (Art. 9.3).
        let addr = if i % 2 == 0 {
            "somchai@mpt.gov.la"
        } else {
            "SomChai@mpt.gov.la"
        };
        tasks.push(tokio::spawn(async move {
            api.post("/v1/users", WRITE, user(addr, "person")).await.0
        }));
    }
    let mut created = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => conflicts += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((created, conflicts), (1, 15));
    let creates = api
        .audit()
        .iter()
        .filter(|r| r["action"] == "user.create")
        .count();
    assert_eq!(creates, 1);
    std::sync::Arc::into_inner(api).unwrap().stop().await;
}

#[tokio::test]
async fn status_changes_follow_the_lifecycle() {
    let api = Api::start().await;
    api.mpt().await;
    let a = "champa@mpt.gov.la";
    api.post(
        "/v1/users",
        WRITE,
        json!({"address": a, "kind": "person", "status": "pending"}),
    )
    .await;
    let p = |action: &str| format!("/v1/users/{a}/{action}");

    // pending -> restore refused, activate ok
    let (s, b) = api.post(&p("restore"), WRITE, json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(b["error"].as_str().unwrap().contains("not suspended"));
    let (s, b) = api.post(&p("activate"), WRITE, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "active");

    let (s, b) = api.post(&p("suspend"), WRITE, json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["error"].as_str().unwrap().contains("reason"));
    let (s, b) = api
        .post(&p("suspend"), WRITE, json!({"reason": "on leave"}))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["status"], "suspended");
    assert_eq!(b["status_reason"], "on leave");
    let (s, _) = api
        .post(&p("suspend"), WRITE, json!({"reason": "again"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // restore with an empty body works (reason optional)
    let resp = api
        .http
        .post(format!("{}{}", api.url, p("restore")))
        .bearer_auth(WRITE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "active");

    // withdraw: confirmation must name the address
    let (s, b) = api
        .post(&p("withdraw"), ADMIN, json!({"reason": "left"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["confirm_required"], a);
    let (s, _) = api
        .post(
            &p("withdraw"),
            ADMIN,
            json!({"reason": "left", "confirm": "other@mpt.gov.la"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, b) = api
        .post(
            &p("withdraw"),
            ADMIN,
            json!({"reason": "left", "confirm": a}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "withdrawn");

    // withdrawal is final
    for action in ["restore", "activate"] {
        let (s, b) = api.post(&p(action), WRITE, json!({})).await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert!(b["error"].as_str().unwrap().contains("final"), "{b}");
    }
    let (s, _) = api.post(&p("suspend"), WRITE, json!({"reason": "x"})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    // and the name stays taken
    let (s, _) = api.post("/v1/users", WRITE, user(a, "person")).await;
    assert_eq!(s, StatusCode::CONFLICT);

    let (s, _) = api
        .post(
            "/v1/users/nobody@mpt.gov.la/suspend",
            WRITE,
            json!({"reason": "x"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api.post(&p("delete"), ADMIN, json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    api.stop().await;
}

#[tokio::test]
async fn changes_reach_the_mail_path_at_once() {
    let api = Api::start().await;
    api.mpt().await;
    let addr = Address::parse("champa@mpt.gov.la").unwrap();
    let tx = Transaction::new(Protocol::Policy);
    // Unknown at first (cached as such for an hour), then registered: visible at once.
    assert_eq!(
        api.checker.check_rcpt(&tx, &addr).await.action,
        Action::Continue
    );
    api.post("/v1/users", WRITE, user("champa@mpt.gov.la", "person"))
        .await;
    assert_eq!(
        api.checker.check_rcpt(&tx, &addr).await.action,
        Action::Continue
    );

    api.post(
        "/v1/users/champa@mpt.gov.la/suspend",
        WRITE,
        json!({"reason": "x"}),
    )
    .await;
    match api.checker.check_rcpt(&tx, &addr).await.action {
        Action::Reject(r) => assert_eq!((r.code, r.enhanced), (550, "5.2.1")),
        other => panic!("suspended account still receives: {other:?}"),
    }
    api.post("/v1/users/champa@mpt.gov.la/restore", WRITE, json!({}))
        .await;
    assert_eq!(
        api.checker.check_rcpt(&tx, &addr).await.action,
        Action::Continue
    );

    // Ceasing the organisation drops every cached entry.
    api.post(
        "/v1/orgs/mpt/cease",
        ADMIN,
        json!({"reason": "merged", "confirm": "mpt"}),
    )
    .await;
    match api.checker.check_rcpt(&tx, &addr).await.action {
        Action::Reject(r) => assert_eq!((r.code, r.enhanced), (550, "5.1.1")),
        other => panic!("ceased organisation still receives: {other:?}"),
    }
    api.stop().await;
}

#[tokio::test]
async fn listing_users_filters_by_org_and_status() {
    let api = Api::start().await;
    api.mpt().await;
    api.post(
        "/v1/orgs",
        WRITE,
        json!({"code": "mofa", "name": "Foreign Affairs"}),
    )
    .await;
    for a in ["b@mpt.gov.la", "a@mpt.gov.la", "c@mofa.gov.la"] {
        api.post("/v1/users", WRITE, user(a, "person")).await;
    }
    api.post(
        "/v1/users/b@mpt.gov.la/suspend",
        WRITE,
        json!({"reason": "x"}),
    )
    .await;
    let addrs = |b: &Value| -> Vec<String> {
        b["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["address"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, b) = api.get("/v1/users", READ).await;
    assert_eq!(addrs(&b), ["a@mpt.gov.la", "b@mpt.gov.la", "c@mofa.gov.la"]);
    let (_, b) = api.get("/v1/users?org=mpt", READ).await;
    assert_eq!(addrs(&b), ["a@mpt.gov.la", "b@mpt.gov.la"]);
    let (_, b) = api.get("/v1/users?org=mpt&status=suspended", READ).await;
    assert_eq!(addrs(&b), ["b@mpt.gov.la"]);
    let (s, _) = api.get("/v1/users?org=nope", READ).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = api.get("/v1/users?status=asleep", READ).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["error"].as_str().unwrap().contains("status"));
    api.stop().await;
}

#[tokio::test]
async fn import_is_all_or_nothing_and_reports_every_bad_line() {
    let api = Api::start().await;
    api.mpt().await;
    api.post("/v1/users", WRITE, user("taken@mpt.gov.la", "person"))
        .await;
    let audit_before = api.audit().len();
    let rows = json!({"rows": [
        {"line": 2, "address": "one@mpt.gov.la", "kind": "person", "name": "One"},
        {"line": 3, "address": "x..y@mpt.gov.la", "kind": "person"},
        {"line": 4, "address": "two@mpt.gov.la", "kind": "unit", "status": "pending"},
        {"line": 5, "address": "ONE@mpt.gov.la", "kind": "person"},
        {"line": 6, "address": "taken@mpt.gov.la", "kind": "person"},
        {"line": 7, "address": "three@mpt.gov.la", "kind": "chief"},
        {"line": 8, "address": "four@nowhere.la", "kind": "person"},
    ]});
    let (s, b) = api.post("/v1/users/import", WRITE, rows).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("nothing was imported")
    );
    let lines: Vec<u64> = b["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [3, 5, 6, 7, 8]);
    let errs: Vec<&str> = b["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["error"].as_str().unwrap())
        .collect();
    assert!(errs[0].contains("R3"), "{errs:?}");
    assert!(errs[1].contains("line 2"), "{errs:?}");
    assert!(errs[2].contains("already registered"), "{errs:?}");
    assert!(errs[3].contains("R5"), "{errs:?}");
    assert!(
        errs[4].contains("not the domain of a registered organisation"),
        "{errs:?}"
    );
    let (_, b) = api.get("/v1/users", READ).await;
    assert_eq!(
        b["users"].as_array().unwrap().len(),
        1,
        "nothing imported: {b}"
    );
    assert_eq!(api.audit().len(), audit_before);

    let rows = json!({"rows": [
        {"line": 2, "address": "one@mpt.gov.la", "kind": "person", "name": "One"},
        {"line": 4, "address": "two@mpt.gov.la", "kind": "unit", "status": "pending"},
    ]});
    let (s, b) = api.post("/v1/users/import", WRITE, rows).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["imported"], 2);
    assert_eq!(
        api.get("/v1/users/two@mpt.gov.la", READ).await.1["status"],
        "pending"
    );
    let audit = api.audit();
    assert_eq!(audit.len(), audit_before + 2);
    assert_eq!(audit[audit_before]["action"], "user.import");
    assert_eq!(audit[audit_before]["object"], "one@mpt.gov.la");

    let (s, _) = api
        .post("/v1/users/import", WRITE, json!({"rows": []}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = api
        .post("/v1/users/import", READ, json!({"rows": []}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    api.stop().await;
}

#[tokio::test]
async fn every_change_is_audited_with_actor_before_and_after() {
    let api = Api::start().await;
    api.mpt().await;
    api.post(
        "/v1/users",
        WRITE,
        json!({"address": "champa@mpt.gov.la", "kind": "person"}),
    )
    .await;
    api.post(
        "/v1/users/champa@mpt.gov.la/suspend",
        WRITE,
        json!({"reason": "on leave"}),
    )
    .await;
    api.post(
        "/v1/users/champa@mpt.gov.la/withdraw",
        ADMIN,
        json!({"reason": "left the ministry", "confirm": "champa@mpt.gov.la"}),
    )
    .await;
    // Reads and refusals are not changes.
    api.get("/v1/users", READ).await;
    api.post("/v1/users/champa@mpt.gov.la/restore", WRITE, json!({}))
        .await;

    let audit = api.audit();
    let actions: Vec<&str> = audit
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["org.create", "user.create", "user.suspend", "user.withdraw"]
    );
    for r in &audit {
        assert!(chrono::DateTime::parse_from_rfc3339(r["time"].as_str().unwrap()).is_ok());
        assert_eq!(r["client_ip"], "127.0.0.1");
    }
    assert_eq!(audit[0]["actor"], "registrar");
    assert_eq!(audit[0]["object"], "mpt");
    assert_eq!(audit[1]["before"], Value::Null);
    assert_eq!(audit[1]["after"]["status"], "active");
    assert_eq!(audit[2]["before"]["status"], "active");
    assert_eq!(audit[2]["after"]["status"], "suspended");
    assert_eq!(audit[2]["reason"], "on leave");
    assert_eq!(audit[3]["actor"], "security");
    assert_eq!(audit[3]["object"], "champa@mpt.gov.la");
    assert_eq!(audit[3]["before"]["status"], "suspended");
    assert_eq!(audit[3]["after"]["status"], "withdrawn");
    assert_eq!(audit[3]["reason"], "left the ministry");

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(api.audit_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(api.audit_path()).unwrap();
    assert!(
        !text.contains(WRITE) && !text.contains(ADMIN),
        "no secrets in the audit log"
    );
    api.stop().await;
}

#[tokio::test]
async fn a_rotated_audit_log_is_reopened() {
    let api = Api::start().await;
    api.mpt().await;
    let rotated = api.dir.path().join("audit.jsonl.1");
    std::fs::rename(api.audit_path(), &rotated).unwrap();
    api.post(
        "/v1/orgs",
        WRITE,
        json!({"code": "mofa", "name": "Foreign Affairs"}),
    )
    .await;
    let audit = api.audit();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["object"], "mofa");
    assert_eq!(std::fs::read_to_string(rotated).unwrap().lines().count(), 1);
    api.stop().await;
}

#[tokio::test]
async fn when_the_audit_log_cannot_be_opened_nothing_is_changed() {
    let api = Api::start_with(|c, dir| {
        // A regular file where the log's directory should be: it can be neither created
        // nor opened (a missing directory alone would be created on first use).
        std::fs::write(dir.join("not-a-dir"), b"").unwrap();
        c.admin.audit_log = dir.join("not-a-dir").join("audit.jsonl");
    })
    .await;
    let (s, b) = api
        .post("/v1/orgs", WRITE, json!({"code": "mpt", "name": "MPT"}))
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{b}");
    let e = b["error"].as_str().unwrap();
    assert!(
        e.contains("admin.audit_log") && e.contains("nothing was changed"),
        "{e}"
    );
    let (s, _) = api.get("/v1/orgs/mpt", READ).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    api.stop().await;
}

#[tokio::test]
async fn a_failed_audit_write_after_the_change_is_a_500_that_says_the_change_stands() {
    // /dev/full opens fine and fails every write with ENOSPC: the disk-full case.
    let api = Api::start_with(|c, _| c.admin.audit_log = "/dev/full".into()).await;
    let (s, b) = api
        .post("/v1/orgs", WRITE, json!({"code": "mpt", "name": "MPT"}))
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{b}");
    assert_eq!(b["changed"], true);
    assert_eq!(b["result"]["code"], "mpt");
    assert!(
        b["error"].as_str().unwrap().contains("the change was made"),
        "{b}"
    );
    // The store has no undo: the organisation exists.
    let (s, _) = api.get("/v1/orgs/mpt", READ).await;
    assert_eq!(s, StatusCode::OK);
    api.stop().await;
}

#[tokio::test]
async fn malformed_json_is_a_400_naming_the_field() {
    let api = Api::start().await;
    api.mpt().await;
    let (s, b) = api
        .post("/v1/users", WRITE, json!({"address": "a@mpt.gov.la"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["error"].as_str().unwrap().contains("kind"), "{b}");
    let (s, b) = api
        .post("/v1/orgs", WRITE, json!({"code": 5, "name": "x"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["error"].as_str().unwrap().contains("code"), "{b}");
    let (s, b) = api
        .post(
            "/v1/users/a@mpt.gov.la/withdraw",
            ADMIN,
            json!({"reason": "x", "confrim": "a@mpt.gov.la"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["error"].as_str().unwrap().contains("confrim"), "{b}");
    let resp = api
        .http
        .post(format!("{}/v1/orgs", api.url))
        .bearer_auth(WRITE)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(
        resp.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("malformed JSON")
    );
    let (s, b) = api.call(Method::GET, "/v2/nothing", Some(READ), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(b["error"].is_string());
    api.stop().await;
}

#[tokio::test]
async fn metrics_are_openmetrics_and_count_admin_requests() {
    let api = Api::start().await;
    api.call(Method::GET, "/v1/orgs", None, None).await;
    api.get("/v1/orgs", READ).await;
    let resp = api
        .http
        .get(format!("{}/metrics", api.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()[header::CONTENT_TYPE],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = resp.text().await.unwrap();
    assert!(
        text.contains(r#"mailwarden_admin_requests_total{result="unauthorized"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"mailwarden_admin_requests_total{result="ok"} 1"#),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"));
    api.stop().await;

    let api = Api::start_with(|c, _| c.admin.metrics_require_token = true).await;
    let (s, _) = api.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, b) = api.get("/metrics", READ).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        b.as_str()
            .unwrap()
            .contains("mailwarden_admin_requests_total")
    );
    api.stop().await;
}

#[tokio::test]
async fn healthz_and_store_outages() {
    let api = Api::start().await;
    let (s, b) = api.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["store"], "up");
    api.store.set_down(true);
    let (s, b) = api.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b["store"], "down");
    let (s, b) = api
        .post("/v1/orgs", WRITE, json!({"code": "mpt", "name": "MPT"}))
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert!(b["error"].as_str().unwrap().contains("nothing was changed"));
    assert!(api.audit().is_empty());
    api.stop().await;
}

#[tokio::test]
async fn serves_https_when_a_certificate_is_configured() {
    let api = Api::start_tls().await;
    assert!(api.url.starts_with("https://"));
    api.mpt().await;
    let (s, b) = api.get("/v1/orgs/mpt", READ).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // Plain HTTP to the TLS port gets nowhere.
    let plain = mailwarden::admin::cli::http_client(None, false).unwrap();
    let r = plain
        .get(api.url.replace("https://", "http://") + "/healthz")
        .send()
        .await;
    assert!(r.is_err() || !r.unwrap().status().is_success());
    // A client that does not trust the certificate refuses it.
    let untrusting = mailwarden::admin::cli::http_client(None, true).unwrap();
    assert!(
        untrusting
            .get(format!("{}/healthz", api.url))
            .send()
            .await
            .is_err()
    );
    api.stop().await;
}

/// A certificate renewed in place is served after a configuration reload (what SIGHUP
/// does), without a restart; before the reload the old one still is.
#[tokio::test]
async fn a_renewed_certificate_is_served_after_a_reload() {
    let api = Api::start_tls().await;
    let dir = api.dir.path();
    std::fs::copy(dir.join("cert.pem"), dir.join("old.pem")).unwrap();
    let trusting =
        |ca: &str| mailwarden::admin::cli::http_client(Some(&dir.join(ca)), true).unwrap();
    let healthy = async |client: reqwest::Client| {
        client
            .get(format!("{}/healthz", api.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    };
    assert!(healthy(trusting("old.pem")).await);

    let renewed = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("new.pem"), renewed.cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), renewed.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), renewed.signing_key.serialize_pem()).unwrap();
    assert!(!healthy(trusting("new.pem")).await, "not before the reload");
    assert!(healthy(trusting("old.pem")).await);

    api.checker
        .replace_config(api.checker.snapshot().config.clone());
    assert!(
        healthy(trusting("new.pem")).await,
        "the renewed certificate"
    );
    assert!(!healthy(trusting("old.pem")).await, "the old one is gone");
    api.stop().await;
}

#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections() {
    let api = Api::start().await;
    // Leave a keep-alive connection open in the client's pool, then stop: `stop` asserts
    // that serve returns and the connection tasks drain.
    let (s, _) = api.get("/v1/orgs", READ).await;
    assert_eq!(s, StatusCode::OK);
    api.stop().await;
}

#[tokio::test]
async fn relay_networks_are_added_removed_audited_and_reach_the_mail_path() {
    let api = Api::start().await;
    api.mpt().await;
    api.post("/v1/users", WRITE, user("champa@mpt.gov.la", "person"))
        .await;
    // From 192.0.2.10 over TLS, not authenticated: fine while mpt declares no networks.
    let mut tx = Transaction::new(Protocol::Policy);
    tx.client_addr = Some("192.0.2.10".parse().unwrap());
    tx.tls_version = Some("TLSv1.3".into());
    tx.sender = Some(mailwarden::model::Sender::parse("champa@mpt.gov.la"));
    assert_eq!(api.checker.check_mail(&tx).await.action, Action::Continue);

    // Read scope cannot change them; bad CIDRs are a 400 naming the value.
    let (s, _) = api
        .post(
            "/v1/orgs/mpt/relays",
            READ,
            json!({"add": ["203.0.113.0/24"]}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = api
        .post(
            "/v1/orgs/mpt/relays",
            WRITE,
            json!({"add": ["203.0.113.0/33"]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b.to_string().contains("203.0.113.0/33"), "{b}");
    let (s, _) = api.post("/v1/orgs/mpt/relays", WRITE, json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = api
        .post(
            "/v1/orgs/nope/relays",
            WRITE,
            json!({"add": ["10.0.0.0/8"]}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, b) = api
        .post(
            "/v1/orgs/MPT/relays",
            WRITE,
            json!({"add": ["203.0.113.7/24", "2001:db8::1"], "reason": "NIDC servers"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        b["relay_networks"],
        json!(["203.0.113.0/24", "2001:db8::1/128"])
    );
    // At once on the mail path: 192.0.2.10 is not one of them.
    match api.checker.check_mail(&tx).await.action {
        Action::Reject(r) => assert_eq!((r.code, r.enhanced), (550, "5.7.1")),
        other => panic!("unauthorised relay accepted: {other:?}"),
    }
    tx.client_addr = Some("203.0.113.25".parse().unwrap());
    assert_eq!(api.checker.check_mail(&tx).await.action, Action::Continue);

    let (s, b) = api
        .post(
            "/v1/orgs/mpt/relays",
            WRITE,
            json!({"remove": ["203.0.113.0/24"]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["relay_networks"], json!(["2001:db8::1/128"]));
    let (_, shown) = api.get("/v1/orgs/mpt", READ).await;
    assert_eq!(shown["relay_networks"], json!(["2001:db8::1/128"]));

    let audit = api.audit();
    let relays: Vec<&Value> = audit
        .iter()
        .filter(|r| r["action"] == "org.relays")
        .collect();
    assert_eq!(relays.len(), 2);
    assert_eq!(relays[0]["object"], "mpt");
    assert_eq!(relays[0]["before"]["relay_networks"], json!([]));
    assert_eq!(relays[0]["reason"], "NIDC servers");
    assert_eq!(
        relays[1]["after"]["relay_networks"],
        json!(["2001:db8::1/128"])
    );
    api.stop().await;
}

#[tokio::test]
async fn sending_limits_are_shown_reset_and_lifted_by_the_bulk_permission() {
    let api = Api::start_with(|c, _| {
        c.rules.insert(
            "R14".into(),
            mailwarden::config::RuleTable {
                messages_per_hour: Some(2),
                ..Default::default()
            },
        );
    })
    .await;
    api.mpt().await;
    api.post("/v1/users", WRITE, user("champa@mpt.gov.la", "person"))
        .await;
    let mut tx = Transaction::new(Protocol::Policy);
    tx.sasl_username = Some("champa@mpt.gov.la".into());
    let to = Address::parse("friend@example.org").unwrap();
    let send = async || api.checker.check_rcpt(&tx, &to).await.action;
    assert_eq!(send().await, Action::Continue);
    assert_eq!(send().await, Action::Continue);
    match send().await {
        Action::Tempfail(r) => assert_eq!((r.code, r.enhanced), (450, "4.7.1")),
        other => panic!("third message this hour passed: {other:?}"),
    }

    let (s, b) = api.get("/v1/users/champa@mpt.gov.la/limits", READ).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["bulk"], false);
    assert_eq!(b["counters"][0]["counter"], "messages:hour");
    assert_eq!(b["counters"][0]["count"], 2);
    assert_eq!(b["counters"][0]["limit"], 2);
    assert_eq!(b["counters"][2]["counter"], "recipients:hour");
    assert_eq!(b["counters"][2]["count"], 2);

    let (s, _) = api
        .post("/v1/users/champa@mpt.gov.la/limits/reset", READ, json!({}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = api
        .post(
            "/v1/users/champa@mpt.gov.la/limits/reset",
            WRITE,
            json!({"reason": "newsletter approved"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["counters"][0]["count"], 0);
    assert_eq!(send().await, Action::Continue);

    // The bulk permission needs admin; with it the limits no longer apply.
    let (s, b) = api
        .post(
            "/v1/users/champa@mpt.gov.la/permissions",
            WRITE,
            json!({"bulk": true}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = api
        .post(
            "/v1/users/champa@mpt.gov.la/permissions",
            ADMIN,
            json!({"bulk": true, "reason": "ministry newsletter"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["bulk"], true);
    for _ in 0..5 {
        assert_eq!(send().await, Action::Continue);
    }
    let (_, b) = api.get("/v1/users/champa@mpt.gov.la", READ).await;
    assert_eq!(b["bulk"], true);
    let (s, _) = api
        .post(
            "/v1/users/nobody@mpt.gov.la/permissions",
            ADMIN,
            json!({"bulk": true}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Withdrawing it brings the limits back (1 message counted since the reset).
    api.post(
        "/v1/users/champa@mpt.gov.la/permissions",
        ADMIN,
        json!({"bulk": false}),
    )
    .await;
    assert_eq!(send().await, Action::Continue);
    assert!(matches!(send().await, Action::Tempfail(_)));

    let audit = api.audit();
    let changes: Vec<(&str, &str)> = audit
        .iter()
        .skip(2)
        .map(|r| (r["action"].as_str().unwrap(), r["object"].as_str().unwrap()))
        .collect();
    assert_eq!(
        changes,
        [
            ("user.limits_reset", "champa@mpt.gov.la"),
            ("user.permit", "champa@mpt.gov.la"),
            ("user.permit", "champa@mpt.gov.la"),
        ]
    );
    assert_eq!(audit[2]["before"]["counters"][0]["count"], 2);
    assert_eq!(audit[2]["reason"], "newsletter approved");
    assert_eq!(audit[3]["before"]["bulk"], false);
    assert_eq!(audit[3]["after"]["bulk"], true);
    api.stop().await;
}

/// R13 through the API: the quota is set (audited), usage is reported by a mailbox server
/// (not audited), and the mail path refuses the recipient once usage plus SIZE= pass it.

#[tokio::test]
async fn quota_is_set_usage_reported_and_enforced() {
    let api = Api::start().await;
    api.mpt().await;
    api.post("/v1/users", WRITE, user("champa@mpt.gov.la", "person"))
        .await;
    let (s, b) = api
        .post(
            "/v1/users/champa@mpt.gov.la/quota",
            WRITE,
            json!({"bytes": 1000, "reason": "standard mailbox"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["quota_bytes"], 1000);
    let (s, b) = api
        .post(
            "/v1/users/champa@mpt.gov.la/usage",
            WRITE,
            json!({"bytes": 900}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["usage_bytes"], 900);
    assert_eq!(b["quota_bytes"], 1000);
    let (s, _) = api
        .post(
            "/v1/users/champa@mpt.gov.la/usage",
            READ,
            json!({"bytes": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = api
        .post(
            "/v1/users/champa@mpt.gov.la/usage",
            WRITE,
            json!({"bytes": -1}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let rcpt = Address::parse("champa@mpt.gov.la").unwrap();
    let mut tx = Transaction::new(Protocol::Policy);
    tx.size = Some(100);
    assert_eq!(
        api.checker.check_rcpt(&tx, &rcpt).await.action,
        Action::Continue
    );
    tx.size = Some(101);
    match api.checker.check_rcpt(&tx, &rcpt).await.action {
        Action::Tempfail(r) => assert_eq!((r.code, r.enhanced), (452, "4.2.2")),
        other => panic!("over quota accepted: {other:?}"),
    }
    // Removing the quota lifts it at once.
    let (s, b) = api
        .post(
            "/v1/users/champa@mpt.gov.la/quota",
            WRITE,
            json!({"bytes": null}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        api.checker.check_rcpt(&tx, &rcpt).await.action,
        Action::Continue
    );

    let actions: Vec<String> = api
        .audit()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        actions,
        ["org.create", "user.create", "user.quota", "user.quota"]
    );
    api.stop().await;
}

#[tokio::test]
async fn delegations_are_added_removed_audited_shown_and_reach_the_mail_path_at_once() {
    let api = Api::start().await;
    api.mpt().await;
    for (a, kind) in [
        ("cabinet@mpt.gov.la", "unit"),
        ("champa@mpt.gov.la", "person"),
    ] {
        let (s, b) = api.post("/v1/users", WRITE, user(a, kind)).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    // champa, logged in, sending as cabinet@: refused, and that answer is now cached.
    let mut tx = Transaction::new(Protocol::Milter);
    tx.sasl_username = Some("champa@mpt.gov.la".into());
    tx.tls_version = Some("TLSv1.3".into());
    tx.sender = Some(mailwarden::model::Sender::parse("<cabinet@mpt.gov.la>"));
    let send_as_cabinet = async || api.checker.check_mail(&tx).await.action;
    match send_as_cabinet().await {
        Action::Reject(r) => {
            assert_eq!((r.code, r.enhanced), (553, "5.7.1"));
            assert!(r.text.contains("<cabinet@mpt.gov.la> is not yours"), "{r}");
        }
        other => panic!("not delegated yet, but {other:?}"),
    }

    let path = "/v1/users/cabinet@mpt.gov.la/delegates";
    let (s, _) = api
        .post(path, READ, json!({"delegate": "champa@mpt.gov.la"}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = api
        .post(
            path,
            WRITE,
            json!({"delegate": "Champa@MPT.gov.la", "reason": "secretary of the cabinet"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["changed"], true);
    assert_eq!(b["delegates"], json!(["champa@mpt.gov.la"]));
    // The mail path sees it at once (the cached "no delegates" was dropped).
    assert_eq!(send_as_cabinet().await, Action::Continue);
    // Again: nothing changes, nothing audited.
    let (s, b) = api
        .post(path, WRITE, json!({"delegate": "champa@mpt.gov.la"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["changed"], false);

    // `user show` lists both directions.
    let (_, b) = api.get("/v1/users/cabinet@mpt.gov.la", READ).await;
    assert_eq!(b["delegates"], json!(["champa@mpt.gov.la"]));
    assert_eq!(b["may_send_as"], json!([]));
    let (_, b) = api.get("/v1/users/champa@mpt.gov.la", READ).await;
    assert_eq!(b["may_send_as"], json!(["cabinet@mpt.gov.la"]));

    // Refusals: unknown accounts, self-delegation, bad addresses, unknown fields.
    for (path, body, status, says) in [
        (
            path,
            json!({"delegate": "nobody@mpt.gov.la"}),
            StatusCode::NOT_FOUND,
            "nobody@mpt.gov.la is not registered",
        ),
        (
            "/v1/users/nobody@mpt.gov.la/delegates",
            json!({"delegate": "champa@mpt.gov.la"}),
            StatusCode::NOT_FOUND,
            "nobody@mpt.gov.la is not registered",
        ),
        (
            path,
            json!({"delegate": "cabinet@mpt.gov.la"}),
            StatusCode::BAD_REQUEST,
            "always sends as itself",
        ),
        (
            path,
            json!({"delegate": "not an address"}),
            StatusCode::BAD_REQUEST,
            "is not an address",
        ),
        (
            path,
            json!({"to": "champa@mpt.gov.la"}),
            StatusCode::BAD_REQUEST,
            "",
        ),
    ] {
        let (s, b) = api.post(path, WRITE, body.clone()).await;
        assert_eq!(s, status, "{body}: {b}");
        assert!(b["error"].as_str().unwrap().contains(says), "{b}");
    }

    let remove = "/v1/users/cabinet@mpt.gov.la/delegates/remove";
    let (s, b) = api
        .post(
            remove,
            WRITE,
            json!({"delegate": "champa@mpt.gov.la", "reason": "left the cabinet"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["delegates"], json!([]));
    assert!(matches!(send_as_cabinet().await, Action::Reject(_)));
    let (s, b) = api
        .post(remove, WRITE, json!({"delegate": "champa@mpt.gov.la"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("is not a delegate of")
    );

    let audit: Vec<Value> = api
        .audit()
        .into_iter()
        .filter(|r| r["action"].as_str().unwrap().contains("delegate"))
        .collect();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(audit[0]["action"], "user.delegate");
    assert_eq!(audit[0]["object"], "cabinet@mpt.gov.la");
    assert_eq!(audit[0]["before"], json!({"delegates": []}));
    assert_eq!(
        audit[0]["after"],
        json!({"delegates": ["champa@mpt.gov.la"]})
    );
    assert_eq!(audit[0]["reason"], "secretary of the cabinet");
    assert_eq!(audit[1]["action"], "user.undelegate");
    assert_eq!(audit[1]["after"], json!({"delegates": []}));
    api.stop().await;
}

/// R13's organisation default: set through the API (write scope, audited as `org.quota`),
/// shown with the organisation, and in force at once for its accounts without a quota of
/// their own; an account's own quota wins.
#[tokio::test]
async fn organisation_default_quota_is_set_audited_and_enforced() {
    let api = Api::start().await;
    api.mpt().await;
    for a in ["champa@mpt.gov.la", "dara@mpt.gov.la"] {
        api.post("/v1/users", WRITE, user(a, "person")).await;
    }
    let (s, _) = api
        .post("/v1/orgs/mpt/quota", READ, json!({"bytes": 1000}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = api
        .post("/v1/orgs/nope/quota", WRITE, json!({"bytes": 1000}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api
        .post("/v1/orgs/mpt/quota", WRITE, json!({"bytes": "lots"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let (s, b) = api
        .post(
            "/v1/orgs/MPT/quota",
            WRITE,
            json!({"bytes": 1000, "reason": "ministry standard"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["default_quota_bytes"], 1000);
    let (_, shown) = api.get("/v1/orgs/mpt", READ).await;
    assert_eq!(shown["default_quota_bytes"], 1000);
    let (_, shown) = api.get("/v1/users/champa@mpt.gov.la", READ).await;
    assert_eq!(shown["quota_bytes"], Value::Null);
    assert_eq!(shown["effective_quota_bytes"], 1000, "{shown}");
    assert_eq!(shown["usage_bytes"], Value::Null, "{shown}");
    // dara has a quota of her own, larger than the default.
    api.post(
        "/v1/users/dara@mpt.gov.la/quota",
        WRITE,
        json!({"bytes": 5000}),
    )
    .await;

    let mut tx = Transaction::new(Protocol::Policy);
    tx.size = Some(1001);
    let champa = Address::parse("champa@mpt.gov.la").unwrap();
    let dara = Address::parse("dara@mpt.gov.la").unwrap();
    match api.checker.check_rcpt(&tx, &champa).await.action {
        Action::Tempfail(r) => assert_eq!((r.code, r.enhanced), (452, "4.2.2")),
        other => panic!("over the organisation default accepted: {other:?}"),
    }
    assert_eq!(
        api.checker.check_rcpt(&tx, &dara).await.action,
        Action::Continue
    );
    let (s, b) = api
        .post("/v1/orgs/mpt/quota", WRITE, json!({"bytes": null}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["default_quota_bytes"], Value::Null);
    assert_eq!(
        api.checker.check_rcpt(&tx, &champa).await.action,
        Action::Continue
    );

    let audit = api.audit();
    let changes: Vec<&Value> = audit
        .iter()
        .filter(|r| r["action"] == "org.quota")
        .collect();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0]["object"], "mpt");
    assert_eq!(changes[0]["before"]["default_quota_bytes"], Value::Null);
    assert_eq!(changes[0]["after"]["default_quota_bytes"], 1000);
    assert_eq!(changes[0]["reason"], "ministry standard");
    assert_eq!(changes[1]["after"]["default_quota_bytes"], Value::Null);
    api.stop().await;
}

/// R15 through the API: a lock by hand (write scope, reason required, audited) refuses the
/// account's mail at MAIL; `show` gives the lock; unlock releases it (audited); locking
/// twice or unlocking an unlocked account is a 409.
#[tokio::test]
async fn accounts_are_locked_shown_and_unlocked() {
    let api = Api::start().await;
    api.mpt().await;
    api.post("/v1/users", WRITE, user("champa@mpt.gov.la", "person"))
        .await;
    let path = "/v1/users/champa@mpt.gov.la";
    let (_, b) = api.get(path, READ).await;
    assert_eq!(b["send_lock"], Value::Null, "{b}");
    assert_eq!(b["last_use"], Value::Null, "{b}");

    let (s, _) = api
        .post(&format!("{path}/lock"), READ, json!({"reason": "x"}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = api.post(&format!("{path}/lock"), WRITE, json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a reason is required: {b}");
    let (s, b) = api
        .post(
            &format!("{path}/lock"),
            WRITE,
            json!({"reason": "password phished, ticket 42"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["send_lock"]["cause"], "manual");
    assert_eq!(b["send_lock"]["by"], "registrar");
    assert!(
        b["send_lock"]["reason"]
            .as_str()
            .unwrap()
            .contains("ticket 42"),
        "{b}"
    );
    let (s, b) = api
        .post(&format!("{path}/lock"), WRITE, json!({"reason": "again"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");

    let mut tx = Transaction::new(Protocol::Milter);
    tx.sasl_username = Some("champa@mpt.gov.la".into());
    tx.tls_version = Some("TLSv1.3".into()); // R11
    tx.sender = Some(mailwarden::model::Sender::parse("champa@mpt.gov.la"));
    match api.checker.check_mail(&tx).await.action {
        Action::Tempfail(r) => assert_eq!((r.code, r.enhanced), (450, "4.7.1")),
        other => panic!("a locked account passed MAIL: {other:?}"),
    }

    let (s, b) = api
        .post(
            &format!("{path}/unlock"),
            WRITE,
            json!({"reason": "owner reached"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["send_lock"], Value::Null);
    assert_eq!(api.checker.check_mail(&tx).await.action, Action::Continue);
    let (s, _) = api.post(&format!("{path}/unlock"), WRITE, json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = api
        .post(
            "/v1/users/nobody@mpt.gov.la/lock",
            WRITE,
            json!({"reason": "x"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let audit = api.audit();
    let tail: Vec<&str> = audit
        .iter()
        .skip(2)
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(tail, ["user.lock", "user.unlock"]);
    assert_eq!(audit[2]["before"]["send_lock"], Value::Null);
    assert_eq!(audit[2]["after"]["send_lock"]["cause"], "manual");
    assert_eq!(audit[3]["before"]["send_lock"]["cause"], "manual");
    assert_eq!(audit[3]["reason"], "owner reached");
    let m = api.checker.metrics.encode();
    assert!(
        m.contains(r#"mailwarden_account_locks_total{cause="manual"} 1"#),
        "{m}"
    );
    assert!(m.contains("mailwarden_account_unlocks_total 1"), "{m}");
    api.stop().await;
}

/// R15 on the mail path: refused recipients lock the sender once their share and number
/// pass the thresholds, and the event hook hears about it.
#[tokio::test]
async fn many_refused_recipients_lock_the_sender_and_raise_an_event() {
    let api = Api::start_with(|c, _| {
        c.rules.insert(
            "R15".into(),
            mailwarden::config::RuleTable {
                reject_min: Some(3),
                reject_share: Some(50),
                ..Default::default()
            },
        );
    })
    .await;
    api.mpt().await;
    for a in ["champa@mpt.gov.la", "old@mpt.gov.la"] {
        api.post("/v1/users", WRITE, user(a, "person")).await;
    }
    api.post(
        "/v1/users/old@mpt.gov.la/suspend",
        WRITE,
        json!({"reason": "left"}),
    )
    .await;
    let (events, mut heard) = tokio::sync::mpsc::channel(4);
    api.checker.add_event_sink(std::sync::Arc::new(events));
    let mut tx = Transaction::new(Protocol::Policy);
    tx.sasl_username = Some("champa@mpt.gov.la".into());
    let ok = Address::parse("friend@example.org").unwrap();
    let bad = Address::parse("old@mpt.gov.la").unwrap();
    assert_eq!(
        api.checker.check_rcpt(&tx, &ok).await.action,
        Action::Continue
    );
    for _ in 0..3 {
        // R1 refuses each (550 5.2.1); the third makes 3 of 4 refused.
        assert!(matches!(
            api.checker.check_rcpt(&tx, &bad).await.action,
            Action::Reject(_)
        ));
    }
    let event = heard.try_recv().expect("the lock was announced");
    assert_eq!(event.address.to_string(), "champa@mpt.gov.la");
    assert_eq!(
        event.lock.cause,
        mailwarden::store::LockCause::Rejections {
            rejected: 3,
            total: 4
        }
    );
    match api.checker.check_rcpt(&tx, &ok).await.action {
        Action::Tempfail(r) => assert_eq!((r.code, r.enhanced), (450, "4.7.1")),
        other => panic!("a locked account's recipient passed: {other:?}"),
    }
    let (_, b) = api.get("/v1/users/champa@mpt.gov.la", READ).await;
    assert!(
        b["send_lock"]["reason"]
            .as_str()
            .unwrap()
            .contains("3 of 4 recipients"),
        "{b}"
    );
    api.stop().await;
}

/// R20 through the API: `inactive_for` lists accounts by last use (or creation); the
/// automatic withdrawal, driven with an injected clock, withdraws them and audits it.
#[tokio::test]
async fn inactive_accounts_are_listed_and_withdrawn_automatically() {
    use mailwarden::store::Store;
    let api = Api::start_with(|c, _| {
        c.activity.auto_withdraw_after = Some(std::time::Duration::from_secs(730 * 86_400));
    })
    .await;
    api.mpt().await;
    for a in ["champa@mpt.gov.la", "kham@mpt.gov.la"] {
        api.post("/v1/users", WRITE, user(a, "person")).await;
    }
    // champa authenticates (written in the background, once per write_interval).
    let mut tx = Transaction::new(Protocol::Policy);
    tx.sasl_username = Some("champa@mpt.gov.la".into());
    tx.sender = Some(mailwarden::model::Sender::parse("champa@mpt.gov.la"));
    api.checker.check_mail(&tx).await;
    let champa = Address::parse("champa@mpt.gov.la").unwrap();
    // The write is a background task with nothing to wait on: poll, bounded.
    let mut used = None;
    for _ in 0..1000 {
        used = api
            .store
            .last_use(std::slice::from_ref(&champa))
            .await
            .unwrap()[0];
        if used.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let used = used.expect("champa's last use was written");
    let now = chrono::Utc::now().timestamp();
    assert!((now - used).abs() < 60, "{used} vs {now}");

    let (s, b) = api.get("/v1/users?inactive_for=1h", READ).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["users"].as_array().unwrap().len(), 0, "both are new: {b}");
    let (s, b) = api.get("/v1/users?inactive_for=soon", READ).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b["error"].as_str().unwrap().contains("inactive_for"), "{b}");

    // Two years and a day later (the clock is injected): kham was never used, champa not
    // since today. Both are withdrawn, audited as the daemon's own change.
    let later = now + 731 * 86_400;
    let log = mailwarden::admin::AuditLog::new();
    let n = mailwarden::admin::system::withdraw_inactive(&api.checker, &log, later).await;
    assert_eq!(n, 2);
    let (_, b) = api.get("/v1/users/kham@mpt.gov.la", READ).await;
    assert_eq!(b["status"], "withdrawn");
    assert!(
        b["status_reason"].as_str().unwrap().contains("never used"),
        "{b}"
    );
    let audit = api.audit();
    let withdrawals: Vec<&Value> = audit
        .iter()
        .filter(|r| r["action"] == "user.withdraw")
        .collect();
    assert_eq!(withdrawals.len(), 2);
    assert!(withdrawals.iter().all(|r| r["actor"] == "mailwarden"));
    assert_eq!(withdrawals[0]["before"]["status"], "active");
    // Nothing left to do.
    assert_eq!(
        mailwarden::admin::system::withdraw_inactive(&api.checker, &log, later).await,
        0
    );
    api.stop().await;
}
