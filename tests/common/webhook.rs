//! A webhook receiver for the alert tests: an HTTP server on 127.0.0.1:0 that records every
//! request (headers and body) and answers 503 to the first `fail_first` requests, 200 after.

use axum::{Router, body::Bytes, http::HeaderMap, http::StatusCode, routing::post};
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Duration;
use tokio::sync::mpsc;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The answer given to it.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name} missing"))
            .to_str()
            .unwrap()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// Checks the signature as a receiver would, independently of mailwarden's code:
    /// HMAC-SHA256 over `<timestamp>.<body>`, hex, after `sha256=`.
    pub fn assert_signed_with(&self, secret: &[u8]) {
        use aws_lc_rs::hmac;
        let ts = self.header("x-mailwarden-timestamp");
        let now = chrono::Utc::now().timestamp();
        let t: i64 = ts.parse().expect("numeric timestamp");
        assert!((now - t).abs() < 300, "fresh timestamp");
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let mut msg = ts.as_bytes().to_vec();
        msg.push(b'.');
        msg.extend_from_slice(&self.body);
        let tag = hmac::sign(&key, &msg);
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            self.header("x-mailwarden-signature"),
            format!("sha256={hex}")
        );
    }
}

pub struct Receiver {
    pub url: String,
    rx: mpsc::UnboundedReceiver<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// The `[alerts]` table of a daemon process posting to this receiver, signing with
    /// `secret`, and locating logins in a GeoIP database written to `dir`: 192.0.2.0/24 is
    /// Laos (LA), 198.51.100.0/24 Thailand (TH), 203.0.113.0/24 Vietnam (VN).
    pub fn alerts_config(&self, secret: &str, dir: &std::path::Path) -> String {
        let db = dir.join("country.mmdb");
        super::mmdb::Mmdb::new()
            .country("192.0.2.0/24", "LA")
            .country("198.51.100.0/24", "TH")
            .country("203.0.113.0/24", "VN")
            .write(&db);
        format!(
            "[alerts]\nwebhook_url = \"{}\"\nwebhook_secret = \"{secret}\"\n\
             webhook_backoff = \"100ms\"\ngeoip_database = \"{}\"\n",
            self.url,
            db.display()
        )
    }

    pub async fn start(fail_first: usize) -> Receiver {
        let (tx, rx) = mpsc::unbounded_channel();
        let seen = Arc::new(AtomicUsize::new(0));
        let app = Router::new().route(
            "/alerts",
            post(move |headers: HeaderMap, body: Bytes| {
                let (tx, seen) = (tx.clone(), seen.clone());
                async move {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    let status = if n < fail_first {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    let _ = tx.send(Received {
                        headers,
                        body,
                        status: status.as_u16(),
                    });
                    status
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/alerts", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { url, rx, task }
    }

    /// The next request, within 30 s.
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
            .await
            .expect("the webhook receiver got a request in time")
            .expect("receiver running")
    }

    /// Whatever arrived so far, without waiting.
    pub fn pending(&mut self) -> Vec<Received> {
        let mut out = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            out.push(r);
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
