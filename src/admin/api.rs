//! Routes and handlers of the admin API. See the module docs of [`super`] for the list.

use super::{
    AppState, Peer,
    audit::AuditRecord,
    auth::{self, Caller},
    error::{self, ApiError},
};
use crate::config::Scope;
use crate::directory::{self, Holder, Rules};
use crate::model::Address;
use crate::store::{
    Account, AccountKind, AccountStatus, LockCause, Org, OrgStatus, SendLock, StatusChange,
    StoreError, Timestamp,
};
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};

/// Most rows one import may carry.
pub const MAX_IMPORT_ROWS: usize = 50_000;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/orgs", get(list_orgs).post(create_org))
        .route("/v1/orgs/{code}", get(show_org))
        .route("/v1/orgs/{code}/cease", post(cease_org))
        .route("/v1/orgs/{code}/relays", post(change_relays))
        .route("/v1/orgs/{code}/quota", post(set_org_quota))
        .route("/v1/orgs/{code}/limits", get(show_org_limits))
        .route("/v1/users", get(list_users).post(create_user))
        .route(
            "/v1/users/import",
            post(import_users).layer(DefaultBodyLimit::max(32 * 1024 * 1024)),
        )
        .route("/v1/users/{address}", get(show_user))
        .route("/v1/users/{address}/permissions", post(set_permissions))
        .route("/v1/users/{address}/quota", post(set_quota))
        .route("/v1/users/{address}/usage", post(set_usage))
        .route("/v1/users/{address}/limits", get(show_limits))
        .route("/v1/users/{address}/limits/reset", post(reset_limits))
        .route("/v1/users/{address}/delegates", post(add_delegate))
        .route(
            "/v1/users/{address}/delegates/remove",
            post(remove_delegate),
        )
        .route("/v1/users/{address}/lock", post(lock_user))
        .route("/v1/users/{address}/unlock", post(unlock_user))
        .route("/v1/users/{address}/{action}", post(change_user))
        .route(
            "/dovecot/auth-policy",
            post(dovecot_auth_policy).layer(DefaultBodyLimit::max(64 * 1024)),
        )
        .fallback(|| async { error::plain(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error::plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Counts every request by result and logs it (method, path, status; never a token).
async fn count(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let s = resp.status();
    let result = match s.as_u16() {
        401 => "unauthorized",
        403 => "forbidden",
        400..=499 => "client_error",
        500..=599 => "server_error",
        _ => "ok",
    };
    state.checker.metrics.count_admin_request(result);
    tracing::debug!(%method, path, status = s.as_u16(), "admin request");
    resp
}

/// A JSON request body. Malformed JSON is a 400 naming the field; an empty body is `{}`.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::new(
                e.status(),
                format!("cannot read the request body: {}", e.body_text()),
            )
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        Json::<T>::from_bytes(bytes)
            .map(|Json(v)| Body(v))
            .map_err(|e| {
                ApiError::bad_request(format!("malformed JSON request: {}", e.body_text()))
            })
    }
}

fn now() -> Timestamp {
    chrono::Utc::now().timestamp()
}

fn rfc3339(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| t.to_string())
}

/// An organisation as the API shows it.
#[derive(Debug, Serialize)]
pub struct OrgView {
    pub code: String,
    pub name: String,
    pub domain: String,
    pub status: OrgStatus,
    pub status_reason: Option<String>,
    pub created_at: String,
    pub status_changed_at: String,
    /// R10: the organisation's authorised relay networks (CIDR).
    pub relay_networks: Vec<String>,
    /// R13: the quota of its accounts that have none of their own (`null`: none).
    pub default_quota_bytes: Option<u64>,
}

impl From<&Org> for OrgView {
    fn from(o: &Org) -> Self {
        OrgView {
            code: o.code.clone(),
            name: o.name.clone(),
            domain: o.domain.clone(),
            status: o.status,
            status_reason: o.status_reason.clone(),
            created_at: rfc3339(o.created_at),
            status_changed_at: rfc3339(o.status_changed_at),
            relay_networks: o.relay_networks.iter().map(|n| n.to_string()).collect(),
            default_quota_bytes: o.default_quota_bytes,
        }
    }
}

/// An account as the API shows it.
#[derive(Debug, Serialize)]
pub struct UserView {
    pub address: String,
    pub org: String,
    pub kind: AccountKind,
    pub status: AccountStatus,
    pub status_reason: Option<String>,
    pub name: Option<String>,
    pub created_at: String,
    pub status_changed_at: String,
    pub quota_bytes: Option<u64>,
    /// The bulk permission: exempt from sending limits (R14).
    pub bulk: bool,
}

impl From<&Account> for UserView {
    fn from(a: &Account) -> Self {
        UserView {
            address: a.address.to_string(),
            org: a.org.clone(),
            kind: a.kind,
            status: a.status,
            status_reason: a.status_reason.clone(),
            name: a.display_name.clone(),
            created_at: rfc3339(a.created_at),
            status_changed_at: rfc3339(a.status_changed_at),
            quota_bytes: a.quota_bytes,
            bulk: a.bulk,
        }
    }
}

fn to_value<T: Serialize>(v: T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

impl AppState {
    fn rules(&self) -> Rules {
        Rules::from_config(&self.checker.snapshot().config.directory)
    }

    /// Makes sure the audit log can be written before a change is made: if it cannot, the
    /// change is refused with 500 and nothing happens.
    async fn audit_ready(&self) -> Result<(), ApiError> {
        let path = self.checker.snapshot().config.admin.audit_log.clone();
        self.audit.ready(&path).await.map_err(|e| {
            tracing::error!("audit log unavailable, refusing admin changes: {e}");
            ApiError::internal(format!("{e}; nothing was changed"))
        })
    }

    /// Writes the audit records of a change that happened. When that fails the change stays
    /// (the store has no undo), the records go to the daemon log at error level, and the
    /// caller gets a 500 that says so.
    async fn audit(&self, records: Vec<AuditRecord>, result: Value) -> Result<(), ApiError> {
        let path = self.checker.snapshot().config.admin.audit_log.clone();
        match self.audit.append(&path, records.clone()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                for r in &records {
                    tracing::error!(
                        record = %serde_json::to_string(r).unwrap_or_default(),
                        "audit log write failed ({e}); the change WAS made; this is its audit record"
                    );
                }
                Err(ApiError::internal(format!(
                    "the change was made but its audit record could not be written ({e}); the record is in the daemon log"
                ))
                .with("changed", true)
                .with("result", result))
            }
        }
    }
}

fn record(
    caller: &Caller,
    peer: &Peer,
    action: &'static str,
    object: String,
    before: Value,
    after: Value,
    reason: Option<String>,
) -> AuditRecord {
    AuditRecord {
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        actor: caller.name.clone(),
        action,
        object,
        before,
        after,
        reason,
        client_ip: peer.0.map(|ip| ip.to_string()),
    }
}

// ---- health and metrics ---------------------------------------------------------------

async fn healthz(State(state): State<AppState>) -> Response {
    let timeout = state.checker.snapshot().config.store.timeout;
    let store = state.checker.directory.store().clone();
    let up = matches!(
        tokio::time::timeout(timeout, store.ping()).await,
        Ok(Ok(()))
    );
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if up { "ok" } else { "degraded" },
            "store": if up { "up" } else { "down" },
            "store_kind": store.kind(),
        })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    if state.checker.snapshot().config.admin.metrics_require_token {
        let (parts, _) = req.into_parts();
        let token = auth::bearer(&parts)?;
        let caller = auth::authenticate(&state, token)
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked token", true))?;
        caller.require(Scope::Read, "read metrics")?;
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.checker.metrics.encode(),
    )
        .into_response())
}

// ---- organisations --------------------------------------------------------------------

async fn list_orgs(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Read, "list organisations")?;
    let orgs = state.checker.directory.store().list_orgs().await?;
    let views: Vec<OrgView> = orgs.iter().map(OrgView::from).collect();
    Ok(Json(json!({ "orgs": views })))
}

async fn find_org(state: &AppState, code: &str) -> Result<Org, ApiError> {
    state
        .checker
        .directory
        .store()
        .get_org(&code.to_ascii_lowercase())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("organisation {code:?} is not registered")))
}

async fn show_org(
    State(state): State<AppState>,
    caller: Caller,
    Path(code): Path<String>,
) -> Result<Json<OrgView>, ApiError> {
    caller.require(Scope::Read, "look at organisations")?;
    Ok(Json(OrgView::from(&find_org(&state, &code).await?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrg {
    code: String,
    name: String,
    #[serde(default)]
    domain: Option<String>,
}

async fn create_org(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Body(req): Body<NewOrg>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write, "register an organisation")?;
    let rules = state.rules();
    let code = rules.org_code(req.code.trim())?;
    let domain = rules.org_domain(&code, req.domain.as_deref())?;
    let name = directory::text("name", Some(&req.name))?
        .ok_or_else(|| ApiError::bad_request("name must not be empty"))?;
    let t = now();
    let org = Org {
        code: code.clone(),
        name,
        domain,
        status: OrgStatus::Active,
        status_reason: None,
        created_at: t,
        status_changed_at: t,
        relay_networks: Vec::new(),
        default_quota_bytes: None,
    };
    state.audit_ready().await?;
    match state.checker.directory.store().create_org(&org).await {
        Ok(()) => {}
        Err(StoreError::Conflict { .. }) => {
            return Err(ApiError::conflict(format!(
                "organisation code {:?} or domain {:?} is already registered (R4, Art. 9.3: first come, first served)",
                org.code, org.domain
            ))
            .with("rule", "R4"));
        }
        Err(e) => return Err(e.into()),
    }
    state.checker.directory.invalidate_all();
    let view = to_value(OrgView::from(&org));
    state
        .audit(
            vec![record(
                &caller,
                &peer,
                "org.create",
                code,
                Value::Null,
                view.clone(),
                None,
            )],
            view.clone(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Destructive {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
}

fn required_reason(reason: Option<&str>, what: &str) -> Result<String, ApiError> {
    directory::text("reason", reason)?
        .ok_or_else(|| ApiError::bad_request(format!("a reason is required to {what}")))
}

fn confirmed(confirm: Option<&str>, object: &str, what: &str) -> Result<(), ApiError> {
    match confirm {
        Some(c) if c.trim().eq_ignore_ascii_case(object) => Ok(()),
        _ => Err(ApiError::bad_request(format!(
            "{what} is final and needs explicit confirmation: send \"confirm\": \"{object}\" in the request"
        ))
        .with("confirm_required", object)),
    }
}

async fn cease_org(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path(code): Path<String>,
    Body(req): Body<Destructive>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin, "cease an organisation")?;
    let reason = required_reason(req.reason.as_deref(), "cease an organisation")?;
    let _guard = state.writes.lock().await;
    let org = find_org(&state, &code).await?;
    confirmed(
        req.confirm.as_deref(),
        &org.code,
        &format!("ceasing organisation {}", org.code),
    )?;
    if org.status == OrgStatus::Ceased {
        return Err(ApiError::conflict(format!(
            "organisation {} has already ceased",
            org.code
        )));
    }
    state.audit_ready().await?;
    let change = StatusChange {
        status: OrgStatus::Ceased,
        reason: Some(reason.clone()),
        at: now(),
    };
    let (before, after) = state
        .checker
        .directory
        .store()
        .set_org_status(&org.code, &change)
        .await?;
    state.checker.directory.invalidate_all();
    let after_v = to_value(OrgView::from(&after));
    state
        .audit(
            vec![record(
                &caller,
                &peer,
                "org.cease",
                org.code.clone(),
                to_value(OrgView::from(&before)),
                after_v.clone(),
                Some(reason),
            )],
            after_v.clone(),
        )
        .await?;
    Ok(Json(after_v))
}

/// `POST /v1/orgs/{code}/relays`: R10's authorised relay networks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayChange {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    reason: Option<String>,
}

fn cidrs(field: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, ApiError> {
    list.iter()
        .map(|s| {
            let s = s.trim();
            // A bare address is a one-host network.
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ApiError::bad_request(format!(
                        "{field}: {s:?} is not a network in CIDR notation (203.0.113.0/24, 2001:db8::/48)"
                    ))
                })
        })
        .collect()
}

async fn change_relays(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path(code): Path<String>,
    Body(req): Body<RelayChange>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Write, "change an organisation's relay networks")?;
    let add = cidrs("add", &req.add)?;
    let remove = cidrs("remove", &req.remove)?;
    if add.is_empty() && remove.is_empty() {
        return Err(ApiError::bad_request(
            "nothing to change: give networks to \"add\" and/or \"remove\"",
        ));
    }
    let reason = directory::text("reason", req.reason.as_deref())?;
    let _guard = state.writes.lock().await;
    let org = find_org(&state, &code).await?;
    state.audit_ready().await?;
    let (before, after) = state
        .checker
        .directory
        .store()
        .change_org_relays(&org.code, &add, &remove)
        .await?;
    state.checker.directory.invalidate_all();
    let after_v = to_value(OrgView::from(&after));
    state
        .audit(
            vec![record(
                &caller,
                &peer,
                "org.relays",
                org.code.clone(),
                to_value(OrgView::from(&before)),
                after_v.clone(),
                reason,
            )],
            after_v.clone(),
        )
        .await?;
    Ok(Json(after_v))
}

/// `POST /v1/orgs/{code}/quota`: the organisation's default storage quota (R13), which
/// applies to its accounts without a quota of their own. Audited as `org.quota`.
async fn set_org_quota(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path(code): Path<String>,
    Body(req): Body<Quota>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Write, "change an organisation's default quota")?;
    let reason = directory::text("reason", req.reason.as_deref())?;
    let _guard = state.writes.lock().await;
    let org = find_org(&state, &code).await?;
    state.audit_ready().await?;
    let (before, after) = state
        .checker
        .directory
        .store()
        .set_org_quota(&org.code, req.bytes)
        .await?;
    state.checker.directory.invalidate_all();
    let after_v = to_value(OrgView::from(&after));
    state
        .audit(
            vec![record(
                &caller,
                &peer,
                "org.quota",
                org.code.clone(),
                to_value(OrgView::from(&before)),
                after_v.clone(),
                reason,
            )],
            after_v.clone(),
        )
        .await?;
    Ok(Json(after_v))
}

// ---- accounts -------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserQuery {
    #[serde(default)]
    org: Option<String>,
    #[serde(default)]
    status: Option<String>,
    /// R20: only accounts whose last use (or creation, if never used) is older than this
    /// (`365d`); each listed with `last_use`.
    #[serde(default)]
    inactive_for: Option<String>,
}

async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<UserQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Read, "list accounts")?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let status: Option<AccountStatus> = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            s.parse()
                .map_err(|e: String| ApiError::bad_request(format!("status: {e}")))?,
        ),
    };
    let org = match q.org.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(code) => Some(find_org(&state, code).await?.code),
    };
    let accounts = state
        .checker
        .directory
        .store()
        .list_accounts(org.as_deref())
        .await?;
    let inactive_for = match q.inactive_for.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(humantime::parse_duration(s).map_err(|e| {
            ApiError::bad_request(format!(
                "inactive_for: {s:?} is not a duration like \"365d\": {e}"
            ))
        })?),
    };
    let accounts: Vec<Account> = accounts
        .into_iter()
        .filter(|a| status.is_none_or(|s| a.status == s))
        .collect();
    let Some(idle) = inactive_for else {
        let views: Vec<UserView> = accounts.iter().map(UserView::from).collect();
        return Ok(Json(json!({ "users": views })));
    };
    let addresses: Vec<Address> = accounts.iter().map(|a| a.address.clone()).collect();
    let uses = state.checker.directory.store().last_use(&addresses).await?;
    let cutoff = now().saturating_sub(i64::try_from(idle.as_secs()).unwrap_or(i64::MAX));
    let views: Vec<Value> = crate::activity::inactive(accounts, uses, cutoff)
        .iter()
        .map(|(a, used)| {
            let mut v = to_value(UserView::from(a));
            v["last_use"] = json!(used.map(rfc3339));
            v
        })
        .collect();
    Ok(Json(json!({ "users": views })))
}

fn path_address(s: &str) -> Result<Address, ApiError> {
    Address::parse(s.trim())
        .map_err(|e| ApiError::bad_request(format!("{s:?} is not an address: {e}")))
}

async fn find_user(state: &AppState, address: &Address) -> Result<Account, ApiError> {
    state
        .checker
        .directory
        .store()
        .get_account(address)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("account {address} is not registered")))
}

/// An account with its sending lock (R15) and last use (R20).
async fn user_details(state: &AppState, address: &Address) -> Result<Value, ApiError> {
    let account = find_user(state, address).await?;
    let store = state.checker.directory.store();
    let lock = store.send_lock(address).await?;
    let last_use = store.last_use(std::slice::from_ref(address)).await?;
    let mut v = to_value(UserView::from(&account));
    v["send_lock"] = lock_view(lock.as_ref());
    v["last_use"] = json!(last_use.first().copied().flatten().map(rfc3339));
    // R13: the quota in force (its own, else its organisation's default) and the usage.
    let org = store.get_org(&account.org).await?;
    v["effective_quota_bytes"] = json!(account.effective_quota(org.as_ref()));
    v["usage_bytes"] = json!(store.usage(address).await?);
    // R8: who may send as this account, and as which mailboxes it may send.
    v["delegates"] = to_value(strings(&store.delegates(address).await?));
    v["may_send_as"] = to_value(strings(&store.delegated_to(address).await?));
    Ok(v)
}

fn lock_view(lock: Option<&SendLock>) -> Value {
    match lock {
        None => Value::Null,
        Some(l) => {
            let mut v = to_value(l);
            v["locked_at"] = json!(rfc3339(l.at));
            v["reason"] = json!(l.cause.to_string());
            v
        }
    }
}

async fn show_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(address): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Read, "look at accounts")?;
    let address = path_address(&address)?;
    Ok(Json(user_details(&state, &address).await?))
}

fn strings(a: &[Address]) -> Vec<String> {
    a.iter().map(|a| a.to_string()).collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    address: String,
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

/// A validated registration, before the store is asked.
struct Registration {
    account: Account,
}

fn validate_user(rules: &Rules, req: &NewUser, at: Timestamp) -> Result<Registration, ApiError> {
    let address = rules.address(&req.address)?;
    let kind = directory::account_kind(&req.kind)?;
    let status = directory::initial_status(req.status.as_deref())?;
    let name = directory::text("name", req.name.as_deref())?;
    Ok(Registration {
        account: Account {
            address,
            org: String::new(),
            kind,
            status,
            status_reason: None,
            display_name: name,
            created_at: at,
            status_changed_at: at,
            quota_bytes: None,
            bulk: false,
        },
    })
}

/// The organisation that owns `domain`, which must be active to take new accounts.
fn owning_org(domain: &str, org: Option<Org>) -> Result<Org, ApiError> {
    match org {
        None => Err(ApiError::unprocessable(format!(
            "{domain} is not the domain of a registered organisation; register the organisation first (mailwarden org add)"
        ))),
        Some(o) if o.status == OrgStatus::Ceased => Err(ApiError::unprocessable(format!(
            "organisation {} has ceased (R2, Art. 16.5): it takes no new accounts",
            o.code
        ))
        .with("rule", "R2")),
        Some(o) => Ok(o),
    }
}

async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Body(req): Body<NewUser>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write, "register an account")?;
    let rules = state.rules();
    let Registration { mut account } = validate_user(&rules, &req, now())?;
    let store = state.checker.directory.store().clone();
    let org = owning_org(
        account.address.domain(),
        store.get_org_by_domain(account.address.domain()).await?,
    )?;
    account.org = org.code.clone();
    state.audit_ready().await?;
    match store.create_account(&account).await {
        Ok(()) => {}
        Err(StoreError::Conflict { .. }) => {
            let addr = &account.address;
            let candidates = rules.suggestions(
                addr.local(),
                &Holder {
                    name: account.display_name.as_deref(),
                    kind: Some(account.kind),
                    org: Some(&org.code),
                },
            );
            let taken = store.taken_locals(addr.domain(), &candidates).await?;
            let free: Vec<String> = candidates
                .iter()
                .filter(|c| !taken.contains(c))
                .take(rules.suggestions)
                .map(|c| format!("{c}@{}", addr.domain()))
                .collect();
            return Err(ApiError::conflict(format!(
                "{addr} is already registered (R4, Art. 9.3: first come, first served; names differing only in case are the same name)"
            ))
            .with("rule", "R4")
            .with("suggestions", free));
        }
        Err(StoreError::NotFound { .. }) => {
            return Err(owning_org(account.address.domain(), None).unwrap_err());
        }
        Err(e) => return Err(e.into()),
    }
    state.checker.directory.invalidate_account(&account.address);
    let view = to_value(UserView::from(&account));
    state
        .audit(
            vec![record(
                &caller,
                &peer,
                "user.create",
                account.address.to_string(),
                Value::Null,
                view.clone(),
                None,
            )],
            view.clone(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// The status changes of an account, with who may make them and from where.
#[derive(Debug, Clone, Copy)]
enum UserAction {
    Suspend,
    Restore,
    Activate,
    Withdraw,
}

impl UserAction {
    fn parse(s: &str) -> Option<UserAction> {
        Some(match s {
            "suspend" => UserAction::Suspend,
            "restore" => UserAction::Restore,
            "activate" => UserAction::Activate,
            "withdraw" => UserAction::Withdraw,
            _ => return None,
        })
    }
    fn audit_name(self) -> &'static str {
        match self {
            UserAction::Suspend => "user.suspend",
            UserAction::Restore => "user.restore",
            UserAction::Activate => "user.activate",
            UserAction::Withdraw => "user.withdraw",
        }
    }
    fn scope(self) -> Scope {
        match self {
            UserAction::Withdraw => Scope::Admin,
            _ => Scope::Write,
        }
    }
    fn what(self) -> &'static str {
        match self {
            UserAction::Suspend => "suspend an account",
            UserAction::Restore => "restore an account",
            UserAction::Activate => "activate an account",
            UserAction::Withdraw => "withdraw an account",
        }
    }
    fn target(self) -> AccountStatus {
        match self {
            UserAction::Suspend => AccountStatus::Suspended,
            UserAction::Restore | UserAction::Activate => AccountStatus::Active,
            UserAction::Withdraw => AccountStatus::Withdrawn,
        }
    }
    /// Why the change is refused from `from`, if it is.
    fn refusal(self, addr: &Address, from: AccountStatus) -> Option<String> {
        use AccountStatus::*;
        if from == Withdrawn {
            return Some(format!(
                "{addr} has been withdrawn; withdrawal is final (Art. 16.3–16.6) and cannot be undone; register a different name"
            ));
        }
        match (self, from) {
            (UserAction::Suspend, Suspended) => Some(format!("{addr} is already suspended")),
            (UserAction::Restore, Active | Pending) => Some(format!(
                "{addr} is not suspended (status {from}); only a suspended account can be restored"
            )),
            (UserAction::Activate, Active | Suspended) => Some(format!(
                "{addr} is not pending (status {from}); use restore for a suspended account"
            )),
            _ => None,
        }
    }
}

async fn change_user(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path((address, action)): Path<(String, String)>,
    Body(req): Body<Destructive>,
) -> Result<Json<Value>, ApiError> {
    let Some(action) = UserAction::parse(&action) else {
        return Err(ApiError::not_found(format!(
            "unknown action {action:?}: use suspend, restore, activate or withdraw"
        )));
    };
    caller.require(action.scope(), action.what())?;
    let addr = path_address(&address)?;
    let reason = match action {
        UserAction::Suspend | UserAction::Withdraw => {
            Some(required_reason(req.reason.as_deref(), action.what())?)
        }
        UserAction::Restore | UserAction::Activate => {
            directory::text("reason", req.reason.as_deref())?
        }
    };
    if let UserAction::Withdraw = action {
        confirmed(
            req.confirm.as_deref(),
            &addr.to_string(),
            &format!("withdrawing {addr}"),
        )?;
    }
    // Status changes read, check, then write: one at a time in this process so that a
    // withdrawal cannot be undone by a racing restore.
    let _guard = state.writes.lock().await;
    let current = find_user(&state, &addr).await?;
    if let Some(why) = action.refusal(&addr, current.status) {
        return Err(ApiError::conflict(why).with("status", current.status.as_str()));
    }
    let change = StatusChange {
        status: action.target(),
        reason: reason.clone(),
        at: now(),
    };
    state.audit_ready().await?;
    let changed = state
        .checker
        .directory
        .store()
        .set_account_status(&addr, &change)
        .await?;
    finish_account_change(&state, &caller, &peer, action.audit_name(), reason, changed).await
}

/// The common end of every change to one account, once the store has made it: drop the
/// account from the mail path's cache, append the audit record (before and after; the caller
/// checked `audit_ready` before changing anything) and answer with the account as it is now.
async fn finish_account_change(
    state: &AppState,
    caller: &Caller,
    peer: &Peer,
    action: &'static str,
    reason: Option<String>,
    (before, after): (Account, Account),
) -> Result<Json<Value>, ApiError> {
    state.checker.directory.invalidate_account(&after.address);
    let after_v = to_value(UserView::from(&after));
    state
        .audit(
            vec![record(
                caller,
                peer,
                action,
                after.address.to_string(),
                to_value(UserView::from(&before)),
                after_v.clone(),
                reason,
            )],
            after_v.clone(),
        )
        .await?;
    Ok(Json(after_v))
}

// ---- storage quota (R13) --------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Quota {
    /// Granted bytes; `null` removes the quota.
    bytes: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

/// Sets an account's granted storage. Audited as `user.quota`.
async fn set_quota(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path(address): Path<String>,
    Body(req): Body<Quota>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Write, "change an account's quota")?;
    let addr = path_address(&address)?;
    let reason = directory::text("reason", req.reason.as_deref())?;
    find_user(&state, &addr).await?;
    state.audit_ready().await?;
    let changed = state
        .checker
        .directory
        .store()
        .set_quota(&addr, req.bytes)
        .await?;
    finish_account_change(&state, &caller, &peer, "user.quota", reason, changed).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Usage {
    bytes: u64,
}

/// A mailbox server reports an account's usage. Metering, not a directory change: not
/// audited (it may come every few minutes per account).
async fn set_usage(
    State(state): State<AppState>,
    caller: Caller,
    Path(address): Path<String>,
    Body(req): Body<Usage>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Write, "report mailbox usage")?;
    let addr = path_address(&address)?;
    let account = find_user(&state, &addr).await?;
    let store = state.checker.directory.store();
    store.set_usage(&addr, req.bytes, now()).await?;
    Ok(Json(json!({
        "address": addr.to_string(),
        "usage_bytes": store.usage(&addr).await?,
        "quota_bytes": account.quota_bytes,
    })))
}

// ---- sending limits (R14) -------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Permissions {
    /// Grant (`true`) or withdraw (`false`) the bulk permission.
    bulk: bool,
    #[serde(default)]
    reason: Option<String>,
}

/// Grants or withdraws the bulk permission (exempt from R14's limits). Needs `admin`: it
/// lifts a protection of everyone else's mail. Audited as `user.permit`.
async fn set_permissions(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path(address): Path<String>,
    Body(req): Body<Permissions>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Admin, "change an account's permissions")?;
    let addr = path_address(&address)?;
    let reason = directory::text("reason", req.reason.as_deref())?;
    find_user(&state, &addr).await?;
    state.audit_ready().await?;
    let changed = state
        .checker
        .directory
        .store()
        .set_bulk(&addr, req.bulk)
        .await?;
    finish_account_change(&state, &caller, &peer, "user.permit", reason, changed).await
}

// ---- send-as delegation (R8) ----------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Delegation {
    /// The account that gets (or loses) the right to send as the mailbox.
    delegate: String,
    #[serde(default)]
    reason: Option<String>,
}

/// Lets `delegate` send as the mailbox `{address}` (R8: a role mailbox like `cabinet@`
/// delegated to named people). Audited as `user.delegate`; adding an existing delegation
/// changes nothing and is not audited.
async fn add_delegate(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path(address): Path<String>,
    Body(req): Body<Delegation>,
) -> Result<Json<Value>, ApiError> {
    change_delegation(&state, &caller, &peer, &address, req, true).await
}

/// Ends a delegation. Audited as `user.undelegate`; 404 when there was none.
async fn remove_delegate(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path(address): Path<String>,
    Body(req): Body<Delegation>,
) -> Result<Json<Value>, ApiError> {
    change_delegation(&state, &caller, &peer, &address, req, false).await
}

async fn change_delegation(
    state: &AppState,
    caller: &Caller,
    peer: &Peer,
    mailbox: &str,
    req: Delegation,
    add: bool,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Write, "change who may send as an account")?;
    let mailbox = path_address(mailbox)?;
    let delegate = Address::parse(req.delegate.trim()).map_err(|e| {
        ApiError::bad_request(format!(
            "delegate {:?} is not an address: {e}",
            req.delegate
        ))
    })?;
    let reason = directory::text("reason", req.reason.as_deref())?;
    if delegate == mailbox {
        return Err(ApiError::bad_request(format!(
            "{mailbox} always sends as itself; name another account to delegate to"
        )));
    }
    find_user(state, &mailbox).await?;
    if add {
        find_user(state, &delegate).await?;
    }
    state.audit_ready().await?;
    let store = state.checker.directory.store();
    let before = strings(&store.delegates(&mailbox).await?);
    let changed = if add {
        store.add_delegate(&mailbox, &delegate).await?
    } else {
        store.remove_delegate(&mailbox, &delegate).await?
    };
    if !changed && !add {
        return Err(ApiError::not_found(format!(
            "{delegate} is not a delegate of {mailbox}; nothing was changed"
        )));
    }
    // The mail path sees the change at its next message.
    state.checker.directory.invalidate_account(&mailbox);
    let after = strings(&store.delegates(&mailbox).await?);
    let result = json!({
        "address": mailbox.to_string(),
        "delegate": delegate.to_string(),
        "changed": changed,
        "delegates": after,
    });
    if changed {
        let action = if add {
            "user.delegate"
        } else {
            "user.undelegate"
        };
        state
            .audit(
                vec![record(
                    caller,
                    peer,
                    action,
                    mailbox.to_string(),
                    json!({ "delegates": before }),
                    json!({ "delegates": after }),
                    reason,
                )],
                result.clone(),
            )
            .await?;
    }
    Ok(Json(result))
}

/// An account's counters now, with the limits in force (0: no limit).
async fn limits_view(state: &AppState, addr: &Address) -> Result<Value, ApiError> {
    let account = find_user(state, addr).await?;
    let at = now();
    let counters = state.checker.directory.store().counters(addr, at).await?;
    let snap = state.checker.snapshot();
    let limits = crate::engine::rules::limits::Limits::from_rule(
        &snap.policy.rule(crate::model::RuleId::R14),
    );
    Ok(json!({
        "address": addr.to_string(),
        "bulk": account.bulk,
        "recipients_per_message": limits.recipients_per_message,
        "counters": counter_rows(&counters, |c| limits.limit(c)),
    }))
}

/// Counters as the API shows them, each with its limit (0: no limit).
fn counter_rows(
    counters: &[crate::store::CounterValue],
    limit: impl Fn(crate::store::Counter) -> Option<u64>,
) -> Vec<Value> {
    counters
        .iter()
        .map(|v| {
            json!({
                "counter": v.counter.name(),
                "count": v.count,
                "limit": limit(v.counter).unwrap_or(0),
                "window_start": rfc3339(v.window_start),
                "window_end": rfc3339(v.window_end),
            })
        })
        .collect()
}

/// An organisation's sending counters now (all its accounts together, R14's `org_*`
/// limits), with the limits in force (0: no limit; a counter without a limit is not kept
/// per organisation, and shows 0).
async fn show_org_limits(
    State(state): State<AppState>,
    caller: Caller,
    Path(code): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Read, "look at organisations")?;
    let org = find_org(&state, &code).await?;
    let counters = state
        .checker
        .directory
        .store()
        .org_counters(&org.code, now())
        .await?;
    let snap = state.checker.snapshot();
    let limits = crate::engine::rules::limits::Limits::from_rule(
        &snap.policy.rule(crate::model::RuleId::R14),
    );
    Ok(Json(json!({
        "org": org.code,
        "counters": counter_rows(&counters, |c| limits.org_limit(c)),
    })))
}

async fn show_limits(
    State(state): State<AppState>,
    caller: Caller,
    Path(address): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Read, "look at accounts")?;
    let addr = path_address(&address)?;
    Ok(Json(limits_view(&state, &addr).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reset {
    #[serde(default)]
    reason: Option<String>,
}

/// Sets an account's sending counters back to 0 (e.g. after a legitimate mailing was held
/// up). Audited as `user.limits_reset` with the counts before.
async fn reset_limits(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path(address): Path<String>,
    Body(req): Body<Reset>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Write, "reset an account's sending counters")?;
    let addr = path_address(&address)?;
    let reason = directory::text("reason", req.reason.as_deref())?;
    let before = limits_view(&state, &addr).await?;
    state.audit_ready().await?;
    state
        .checker
        .directory
        .store()
        .reset_counters(&addr, now())
        .await?;
    let after = limits_view(&state, &addr).await?;
    state
        .audit(
            vec![record(
                &caller,
                &peer,
                "user.limits_reset",
                addr.to_string(),
                before,
                after.clone(),
                reason,
            )],
            after.clone(),
        )
        .await?;
    Ok(Json(after))
}

// ---- sending locks (R15) --------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockRequest {
    #[serde(default)]
    reason: Option<String>,
}

/// Locks an account for sending by hand (e.g. on a report of a phished password). Audited
/// as `user.lock`; the reason is required.
async fn lock_user(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path(address): Path<String>,
    Body(req): Body<LockRequest>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Write, "lock an account for sending")?;
    let addr = path_address(&address)?;
    let reason = required_reason(req.reason.as_deref(), "locking an account")?;
    let _guard = state.writes.lock().await;
    let before = user_details(&state, &addr).await?;
    if !before["send_lock"].is_null() {
        return Err(ApiError::conflict(format!(
            "{addr} is already locked for sending: {}",
            before["send_lock"]["reason"].as_str().unwrap_or("")
        )));
    }
    let lock = SendLock {
        at: now(),
        by: caller.name.clone(),
        cause: LockCause::Manual {
            reason: reason.clone(),
        },
    };
    state.audit_ready().await?;
    state
        .checker
        .directory
        .store()
        .set_send_lock(&addr, Some(&lock))
        .await?;
    state.checker.metrics.count_account_lock("manual");
    tracing::warn!(address = %addr, by = %caller.name, "account locked for sending by hand (R15)");
    // R16: the owner hears of it like of an automatic lock.
    state
        .checker
        .alerts
        .send(crate::alerts::Alert::account_locked(
            addr.clone(),
            lock.cause.to_string(),
        ));
    finish_lock_change(
        &state,
        &caller,
        &peer,
        "user.lock",
        &addr,
        before,
        Some(reason),
    )
    .await
}

/// Releases an account's sending lock (automatic or by hand). Audited as `user.unlock`
/// with the lock that was removed.
async fn unlock_user(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Path(address): Path<String>,
    Body(req): Body<LockRequest>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::Write, "release an account's sending lock")?;
    let addr = path_address(&address)?;
    let reason = directory::text("reason", req.reason.as_deref())?;
    let _guard = state.writes.lock().await;
    let before = user_details(&state, &addr).await?;
    if before["send_lock"].is_null() {
        return Err(ApiError::conflict(format!(
            "{addr} is not locked for sending"
        )));
    }
    state.audit_ready().await?;
    state
        .checker
        .directory
        .store()
        .set_send_lock(&addr, None)
        .await?;
    state.checker.metrics.count_account_unlock();
    tracing::info!(address = %addr, by = %caller.name, "sending lock released (R15)");
    finish_lock_change(&state, &caller, &peer, "user.unlock", &addr, before, reason).await
}

async fn finish_lock_change(
    state: &AppState,
    caller: &Caller,
    peer: &Peer,
    action: &'static str,
    addr: &Address,
    before: Value,
    reason: Option<String>,
) -> Result<Json<Value>, ApiError> {
    let after = user_details(state, addr).await?;
    state
        .audit(
            vec![record(
                caller,
                peer,
                action,
                addr.to_string(),
                before,
                after.clone(),
                reason,
            )],
            after.clone(),
        )
        .await?;
    Ok(Json(after))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportRow {
    /// The row's line number in the caller's file, for error messages; defaults to the
    /// row's position (1-based).
    #[serde(default)]
    line: Option<u64>,
    address: String,
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Import {
    rows: Vec<ImportRow>,
}

#[derive(Debug, Serialize)]
struct RowError {
    line: u64,
    address: String,
    error: String,
}

/// All rows or none: every bad row is reported with its line number.
async fn import_users(
    State(state): State<AppState>,
    caller: Caller,
    peer: axum::Extension<Peer>,
    Body(req): Body<Import>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write, "import accounts")?;
    if req.rows.is_empty() {
        return Err(ApiError::bad_request("rows: nothing to import"));
    }
    if req.rows.len() > MAX_IMPORT_ROWS {
        return Err(ApiError::bad_request(format!(
            "rows: {} rows; at most {MAX_IMPORT_ROWS} per import",
            req.rows.len()
        )));
    }
    let rules = state.rules();
    let store = state.checker.directory.store().clone();
    let at = now();
    let mut errors: Vec<RowError> = Vec::new();
    let mut good: Vec<(u64, Account)> = Vec::new();
    let mut seen: HashMap<Address, u64> = HashMap::new();
    let mut orgs: HashMap<String, Option<Org>> = HashMap::new();

    for (i, row) in req.rows.iter().enumerate() {
        let line = row.line.unwrap_or(i as u64 + 1);
        let fail = |errors: &mut Vec<RowError>, error: String| {
            errors.push(RowError {
                line,
                address: row.address.clone(),
                error,
            })
        };
        let new = NewUser {
            address: row.address.clone(),
            kind: row.kind.clone(),
            name: row.name.clone(),
            status: row.status.clone(),
        };
        let mut account = match validate_user(&rules, &new, at) {
            Ok(r) => r.account,
            Err(e) => {
                fail(&mut errors, error_text(&e));
                continue;
            }
        };
        let domain = account.address.domain().to_owned();
        if !orgs.contains_key(&domain) {
            let org = store.get_org_by_domain(&domain).await?;
            orgs.insert(domain.clone(), org);
        }
        match owning_org(&domain, orgs[&domain].clone()) {
            Ok(o) => account.org = o.code,
            Err(e) => {
                fail(&mut errors, error_text(&e));
                continue;
            }
        }
        if let Some(first) = seen.get(&account.address) {
            fail(
                &mut errors,
                format!(
                    "{} is also on line {first} of this import (R4: names differing only in case are the same name)",
                    account.address
                ),
            );
            continue;
        }
        seen.insert(account.address.clone(), line);
        good.push((line, account));
    }

    // Names already registered, asked per domain in one call each.
    let mut by_domain: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, a) in &good {
        by_domain
            .entry(a.address.domain().to_owned())
            .or_default()
            .push(a.address.local().to_owned());
    }
    for (domain, locals) in by_domain {
        let taken = store.taken_locals(&domain, &locals).await?;
        for (line, a) in &good {
            if a.address.domain() == domain && taken.iter().any(|t| t == a.address.local()) {
                errors.push(RowError {
                    line: *line,
                    address: a.address.to_string(),
                    error: format!(
                        "{} is already registered (R4, Art. 9.3: first come, first served)",
                        a.address
                    ),
                });
            }
        }
    }

    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        return Err(ApiError::bad_request(format!(
            "{} of {} rows are invalid; nothing was imported",
            errors.len(),
            req.rows.len()
        ))
        .with("rows", to_value(&errors)));
    }

    let accounts: Vec<Account> = good.into_iter().map(|(_, a)| a).collect();
    state.audit_ready().await?;
    match store.create_accounts(&accounts).await {
        Ok(()) => {}
        Err(StoreError::Conflict { what, name }) => {
            return Err(ApiError::conflict(format!(
                "{what} {name} was registered by someone else meanwhile (R4); nothing was imported"
            ))
            .with("rule", "R4"));
        }
        Err(e) => return Err(e.into()),
    }
    let mut records = Vec::with_capacity(accounts.len());
    let mut views = Vec::with_capacity(accounts.len());
    for a in &accounts {
        state.checker.directory.invalidate_account(&a.address);
        let v = to_value(UserView::from(a));
        records.push(record(
            &caller,
            &peer,
            "user.import",
            a.address.to_string(),
            Value::Null,
            v.clone(),
            None,
        ));
        views.push(v);
    }
    let result = json!({ "imported": accounts.len(), "users": views });
    state.audit(records, result.clone()).await?;
    Ok((StatusCode::CREATED, Json(result)).into_response())
}

#[derive(Debug, Deserialize)]
struct PolicyCommand {
    command: Option<String>,
}

/// Dovecot's authentication policy server (`auth_policy_server_url`, R16): Dovecot POSTs
/// `?command=allow` before (and after) authenticating and `?command=report` with the result;
/// the JSON body carries `login`, `remote` (the client's IP), `protocol`, and in reports
/// `success` and `policy_reject`. A successful login feeds new-country detection (queued,
/// never waited on). The answer is always `{"status":0,"msg":""}` (allow: mailwarden never
/// refuses or delays a login). Needs a token with the `auth_policy` scope, sent by Dovecot
/// through `auth_policy_server_api_header`. The password hash Dovecot sends is ignored.
async fn dovecot_auth_policy(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<PolicyCommand>,
    Body(req): Body<Value>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::AuthPolicy, "report Dovecot logins")?;
    match q.command.as_deref() {
        Some("allow") => {}
        Some("report") => {
            let flag = |name: &str| req.get(name).and_then(Value::as_bool) == Some(true);
            let text = |name: &str| req.get(name).and_then(Value::as_str);
            if flag("success") && !flag("policy_reject") {
                let remote = text("remote").and_then(|r| r.trim().parse().ok());
                if let (Some(login), Some(ip)) = (text("login"), remote) {
                    let via = text("protocol").unwrap_or("dovecot");
                    state.checker.login_seen(login, ip, via);
                }
            }
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown command {:?}: Dovecot sends ?command=allow or ?command=report",
                other.unwrap_or("")
            )));
        }
    }
    Ok(Json(json!({"status": 0, "msg": ""})))
}

fn error_text(e: &ApiError) -> String {
    e.body
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("invalid")
        .to_owned()
}
