//! In-process tests of what the HTTP tests cannot reach: an error's log line, and a failure
//! that no request can provoke (a metrics family the encoder refuses).

use std::sync::{Arc, Mutex};

use axum::{
    Router,
    body::{Body, to_bytes},
    extract::Request,
    http::{HeaderMap, StatusCode, header},
    middleware,
    routing::get,
};
use tower::ServiceExt;

use super::{ApiError, error::log_errors};
use crate::{
    audit::MemorySink,
    config::Config,
    run::AtCapacity,
    server::{Parts, Server},
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The log lines written while `f` runs, as text.
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buf.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

async fn call(app: Router, path: &str) -> (StatusCode, HeaderMap, String) {
    let request = Request::get(path).body(Body::empty()).unwrap();
    let response = app.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, 1 << 20).await.unwrap();
    let body = String::from_utf8(body.to_vec()).unwrap();
    (parts.status, parts.headers, body)
}

/// An internal error answers a bare 500 and its detail is logged once, by the layer; a
/// client's error is answered with its headers and not logged.
#[test]
fn internal_errors_are_logged_by_the_layer_and_never_sent() {
    let app = Router::new()
        .route(
            "/internal",
            get(|| async { Err::<(), _>(ApiError::Internal("disk on fire".into())) }),
        )
        .route(
            "/busy",
            get(|| async { Err::<(), ApiError>(AtCapacity.into()) }),
        )
        .layer(middleware::from_fn(log_errors));
    let mut answers = Vec::new();
    let log = logged(|| {
        runtime().block_on(async {
            answers.push(call(app.clone(), "/internal").await);
            answers.push(call(app, "/busy").await);
        });
    });
    let (status, _, body) = &answers[0];
    assert_eq!(*status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        body,
        r#"{"error":{"type":"internal","message":"internal error"}}"#
    );
    let (status, headers, body) = &answers[1];
    assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert!(body.contains(r#""type":"overloaded""#), "{body}");
    assert_eq!(log.matches("request failed").count(), 1, "{log}");
    assert!(log.contains("disk on fire"), "{log}");
}

/// A scrape that cannot be encoded is a 500 with the JSON error and a log line, not an empty
/// 200 that would look like a service with no metrics.
#[test]
fn a_metrics_encoding_failure_is_a_logged_500() {
    let mut answer = None;
    let log = logged(|| {
        runtime().block_on(async {
            let mut config = Config::defaults();
            config.bind_addr = ([127, 0, 0, 1], 0).into();
            let parts = Parts::from_config(config, Arc::new(MemorySink::new())).unwrap();
            crate::metrics::break_encoding(&parts.metrics);
            let server = Server::start(parts).await.unwrap();
            answer = Some(call(super::router(server.state.clone()), "/metrics").await);
            server.stop().await.unwrap();
        });
    });
    let (status, headers, body) = answer.unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(
        body,
        r#"{"error":{"type":"internal","message":"internal error"}}"#
    );
    let line = log
        .lines()
        .find(|l| l.contains("request failed"))
        .unwrap_or_else(|| panic!("no log line: {log}"));
    assert!(line.contains("encoding the metrics"), "{line}");
    assert!(line.contains("no name"), "{line}");
}
