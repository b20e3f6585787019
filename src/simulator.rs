//! A simulator of the Skypostal partner API, behind `demo`, `mock-upstream` and the tests.
//!
//! It answers `POST /wcf-services/service-customer.svc/partner/customer-get-info` the way the
//! partner does: HTTP 200 with an array of records, business errors inside them.
//!
//! - `johndoe@email.com` gets the record from the partner's documentation.
//! - Addresses starting with `notfound` get the partner's "no information" record (`error_code` 10001).
//! - Any other address gets a record made up from the address (stable across calls).
//! - Wrong partner credentials get the "access denied" record (`error_code` 13001).
//!
//! It can be told to misbehave, for one e-mail or for every call, through [`Simulator::set_fault`]
//! or over HTTP:
//!
//! ```text
//! PUT    /__sim/faults            {"kind":"status","status":500}     every call
//! PUT    /__sim/faults/{email}    {"kind":"slow","ms":3000}          one e-mail
//! DELETE /__sim/faults[/{email}]                                     recover
//! GET    /__sim/stats             {"calls":N,"in_flight":N,"max_in_flight":N}
//! POST   /__sim/reset             forget faults, counters and recorded calls
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

/// The partner path the simulator serves (the documented one).
pub const PARTNER_PATH: &str = "/wcf-services/service-customer.svc/partner/customer-get-info";

/// The e-mail whose record is the one in the partner's documentation.
pub const DOCUMENTED_EMAIL: &str = "johndoe@email.com";

/// How many partner calls are remembered for inspection.
const RECORDED_CALLS: usize = 1000;

/// A way for the simulated partner to misbehave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// Wait this long, then answer normally.
    Slow {
        /// Delay in milliseconds.
        ms: u64,
    },
    /// Answer this HTTP status (optionally with `Retry-After`).
    Status {
        /// The status to answer.
        status: u16,
        /// `Retry-After` seconds, if any.
        #[serde(default)]
        retry_after: Option<u64>,
    },
    /// Answer 200 with an HTML page.
    Garbage,
    /// Send the headers, then drop the connection mid-body.
    Reset,
    /// Answer a valid-looking body of about this many bytes.
    Oversized {
        /// Approximate body size.
        bytes: usize,
    },
    /// Answer the partner's `system_error: true` record.
    SystemError,
    /// Answer the partner's "access denied" record (`error_code` 13001).
    AccessDenied,
    /// Answer the partner's "service unavailable" record (`error_code` 12001).
    Unavailable,
    /// Answer two customer records.
    Ambiguous,
    /// Answer `[]`.
    Empty,
}

/// One partner call as the simulator received it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCall {
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// `Content-Type` header.
    pub content_type: Option<String>,
    /// The body, parsed if it was JSON.
    pub body: Result<Value, String>,
}

/// A running (or ready-to-run) simulator. Cheap to clone: clones share state.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<SimState>,
}

struct SimState {
    user_code: u64,
    app_key: String,
    calls: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    recorded: Mutex<Vec<RecordedCall>>,
    global_fault: Mutex<Option<Fault>>,
    faults: Mutex<HashMap<String, Fault>>,
}

#[derive(Deserialize)]
struct PartnerRequest {
    user_code: Value,
    app_key: Value,
    customer_email: Option<String>,
}

impl Simulator {
    /// A simulator that accepts these partner credentials.
    pub fn new(user_code: u64, app_key: impl Into<String>) -> Self {
        Self {
            state: Arc::new(SimState {
                user_code,
                app_key: app_key.into(),
                calls: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
                max_in_flight: AtomicU64::new(0),
                recorded: Mutex::new(Vec::new()),
                global_fault: Mutex::new(None),
                faults: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The simulator's routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route(PARTNER_PATH, post(customer_get_info))
            .route(
                "/__sim/faults",
                put(put_global_fault).delete(delete_all_faults),
            )
            .route(
                "/__sim/faults/{email}",
                put(put_email_fault).delete(delete_email_fault),
            )
            .route("/__sim/stats", axum::routing::get(stats))
            .route("/__sim/reset", post(reset))
            .with_state(self.clone())
    }

    /// Binds `addr` and serves in a background task; returns the bound address.
    pub async fn spawn(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let router = self.router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "simulator stopped");
            }
        });
        Ok(local)
    }

    /// Sets a fault for one e-mail (`Some`, compared lowercased) or for every call (`None`).
    pub fn set_fault(&self, email: Option<&str>, fault: Fault) {
        match email {
            Some(email) => {
                lock(&self.state.faults).insert(email.to_lowercase(), fault);
            }
            None => *lock(&self.state.global_fault) = Some(fault),
        }
    }

    /// Removes every fault.
    pub fn recover(&self) {
        *lock(&self.state.global_fault) = None;
        lock(&self.state.faults).clear();
    }

    /// Partner calls received so far.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The most partner calls that were in flight at once.
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// The partner calls received (the last 1000).
    pub fn recorded(&self) -> Vec<RecordedCall> {
        lock(&self.state.recorded).clone()
    }

    fn fault_for(&self, email: &str) -> Option<Fault> {
        lock(&self.state.faults)
            .get(&email.to_lowercase())
            .cloned()
            .or_else(|| lock(&self.state.global_fault).clone())
    }

    fn record(&self, call: RecordedCall) {
        let mut recorded = lock(&self.state.recorded);
        if recorded.len() >= RECORDED_CALLS {
            recorded.remove(0);
        }
        recorded.push(call);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a call in flight for as long as it lives.
struct InFlight<'a>(&'a SimState);

impl<'a> InFlight<'a> {
    fn enter(state: &'a SimState) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn customer_get_info(
    State(sim): State<Simulator>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sim.state.calls.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::enter(&sim.state);
    let parsed: Result<Value, String> = serde_json::from_slice(&body).map_err(|e| e.to_string());
    sim.record(RecordedCall {
        method: "POST".to_owned(),
        path: PARTNER_PATH.to_owned(),
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: parsed.clone(),
    });

    // WCF answers a body it cannot bind with an HTML 400.
    let Ok(request) =
        parsed.and_then(|v| serde_json::from_value::<PartnerRequest>(v).map_err(|e| e.to_string()))
    else {
        return html(StatusCode::BAD_REQUEST, "Request Error");
    };
    let Some(email) = request.customer_email else {
        return html(StatusCode::BAD_REQUEST, "Request Error");
    };
    if request.user_code != json!(sim.state.user_code)
        || request.app_key != json!(sim.state.app_key)
    {
        return partner_json(json!([error_record(
            "Access denied: invalid user_code or app_key",
            false,
            json!(13001)
        )]));
    }

    let mut fault = sim.fault_for(&email);
    if let Some(Fault::Slow { ms }) = fault {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        fault = None;
    }
    match fault {
        None | Some(Fault::Slow { .. }) => answer(&email),
        Some(Fault::Status {
            status,
            retry_after,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = html(status, "Service error");
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, secs.into());
            }
            response
        }
        Some(Fault::Garbage) => {
            let mut response = html(StatusCode::OK, "<marquee>maintenance</marquee>");
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Some(Fault::Reset) => {
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from_static(b"[{\"_verify\":tr")),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "simulated reset",
                )),
            ];
            let mut response = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Some(Fault::Oversized { bytes }) => partner_json(json!([{
            "_verify": true,
            "customer_box_id": 1,
            "customer_key": "A".repeat(bytes),
        }])),
        Some(Fault::SystemError) => partner_json(json!([error_record(
            "Object reference not set to an instance of an object.",
            true,
            Value::Null
        )])),
        Some(Fault::AccessDenied) => {
            partner_json(json!([error_record("Access denied", false, json!(13001))]))
        }
        Some(Fault::Unavailable) => partner_json(json!([error_record(
            "Service unavailable",
            false,
            json!(12001)
        )])),
        Some(Fault::Ambiguous) => {
            let record = customer_record(&email);
            partner_json(json!([record.clone(), record]))
        }
        Some(Fault::Empty) => partner_json(json!([])),
    }
}

/// The normal answer for an e-mail.
fn answer(email: &str) -> Response {
    if email.starts_with("notfound") {
        return partner_json(json!([error_record(
            &format!("No information found for customer {email}"),
            false,
            json!(10001)
        )]));
    }
    partner_json(json!([customer_record(email)]))
}

/// A customer record: the documented one, or one made up from the address.
pub fn customer_record(email: &str) -> Value {
    if email == DOCUMENTED_EMAIL {
        return json!({
            "_verify": true,
            "activation_date": "/Date(1550761010000-0500)/",
            "customer_box_id": 811111,
            "customer_first_name": "John",
            "customer_key": "YpbCNpzqxYqVWv+tzg4e4Ex6ALiT+DfKSYA3NY2dZcw=",
            "customer_last_name": "Doe",
            "enrolment_date": "/Date(1550761008000-0500)/",
            "error": {"error_description": "", "error_location": "", "system_error": false},
            "is_active": true,
            "is_business": false,
            "is_enable": true,
            "is_vip": false
        });
    }
    let digest = Sha256::digest(email.as_bytes());
    let box_id = 800_000 + u64::from(u16::from_be_bytes([digest[0], digest[1]]));
    let local = email.rsplit_once('@').map_or(email, |(l, _)| l);
    let first = local.split(['.', '_', '-', '+']).next().unwrap_or(local);
    json!({
        "_verify": true,
        "activation_date": "/Date(1600000000000-0500)/",
        "customer_box_id": box_id,
        "customer_first_name": capitalize(first),
        "customer_key": base64::engine::general_purpose::STANDARD.encode(digest),
        "customer_last_name": "Customer",
        "enrolment_date": "/Date(1599999990000-0500)/",
        "error": {"error_description": "", "error_location": "", "system_error": false},
        "is_active": true,
        "is_business": false,
        "is_enable": true,
        "is_vip": false
    })
}

fn error_record(description: &str, system_error: bool, error_code: Value) -> Value {
    json!({
        "_verify": false,
        "activation_date": null,
        "customer_box_id": 0,
        "customer_key": null,
        "enrolment_date": null,
        "error": {
            "error_description": description,
            "error_location": "PartnerCustomerGetInfo",
            "system_error": system_error
        },
        "error_code": error_code
    })
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn partner_json(value: Value) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        )],
        value.to_string(),
    )
        .into_response()
}

fn html(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/html"))],
        format!("<html><body>{text}</body></html>"),
    )
        .into_response()
}

// === control API ===

async fn put_global_fault(State(sim): State<Simulator>, Json(fault): Json<Fault>) -> StatusCode {
    sim.set_fault(None, fault);
    StatusCode::NO_CONTENT
}

async fn put_email_fault(
    State(sim): State<Simulator>,
    Path(email): Path<String>,
    Json(fault): Json<Fault>,
) -> StatusCode {
    sim.set_fault(Some(email.trim()), fault);
    StatusCode::NO_CONTENT
}

async fn delete_all_faults(State(sim): State<Simulator>) -> StatusCode {
    sim.recover();
    StatusCode::NO_CONTENT
}

async fn delete_email_fault(State(sim): State<Simulator>, Path(email): Path<String>) -> StatusCode {
    lock(&sim.state.faults).remove(&email.trim().to_lowercase());
    StatusCode::NO_CONTENT
}

async fn stats(State(sim): State<Simulator>) -> Json<Value> {
    Json(json!({
        "calls": sim.calls(),
        "in_flight": sim.state.in_flight.load(Ordering::SeqCst),
        "max_in_flight": sim.max_in_flight(),
    }))
}

async fn reset(State(sim): State<Simulator>) -> StatusCode {
    sim.recover();
    sim.state.calls.store(0, Ordering::SeqCst);
    sim.state.max_in_flight.store(0, Ordering::SeqCst);
    lock(&sim.state.recorded).clear();
    StatusCode::NO_CONTENT
}
