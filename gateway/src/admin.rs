//! Admin HTTP: `/metrics` (Prometheus text), `/healthz`, `/readyz`, and a
//! JSON REST API over tenants, namespaces and topics under `/admin/v1`.
//!
//! | method | path | |
//! | --- | --- | --- |
//! | GET | `/admin/v1/tenants` | list tenants |
//! | PUT, DELETE | `/admin/v1/tenants/{tenant}` | create, delete (empty) |
//! | GET | `/admin/v1/namespaces/{tenant}` | list namespaces |
//! | GET | `/admin/v1/namespaces/{tenant}/{ns}` | the namespace's policy |
//! | PUT | `/admin/v1/namespaces/{tenant}/{ns}` | create; optional body: a policy |
//! | POST | `/admin/v1/namespaces/{tenant}/{ns}/policy` | replace the policy |
//! | DELETE | `/admin/v1/namespaces/{tenant}/{ns}` | delete (no topics) |
//! | GET | `/admin/v1/topics/{tenant}/{ns}` | list topics |
//! | GET | `/admin/v1/topics/{tenant}/{ns}/{topic}` | topic metadata |
//! | PUT | `/admin/v1/topics/{tenant}/{ns}/{topic}` | create; body `{"partitions": n, "config": {...}}` |
//! | DELETE | `/admin/v1/topics/{tenant}/{ns}/{topic}` | delete with its data |
//! | GET | `/admin/v1/topics/{tenant}/{ns}/{topic}/stats` | offsets, size, cursor backlogs |
//!
//! Path segments are percent-decoded. Errors are `{"error": "..."}` with
//! 400 (bad input), 404 (not found), 409 (exists / not empty) or 500.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use broker::{Broker, BrokerError, NamespaceName, NamespacePolicy, TopicConfig, TopicName};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const MAX_BODY: usize = 1024 * 1024;

/// What the admin server serves from.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub broker: Arc<Broker>,
    pub metrics: Option<PrometheusHandle>,
    pub ready: Arc<AtomicBool>,
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let io = hyper_util::rt::TokioIo::new(stream);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, &state).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .unwrap_or_default()
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Resp {
    json(status, &serde_json::json!({ "error": msg.to_string() }))
}

fn broker_error(e: &BrokerError) -> Resp {
    let status = match e {
        BrokerError::TenantNotFound(_)
        | BrokerError::NamespaceNotFound(_)
        | BrokerError::TopicNotFound(_)
        | BrokerError::PartitionNotFound { .. } => StatusCode::NOT_FOUND,
        BrokerError::AlreadyExists(_) | BrokerError::NotEmpty(_) => StatusCode::CONFLICT,
        BrokerError::InvalidName { .. } | BrokerError::InvalidArgument(_) => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e)
}

fn decode_segment(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn body_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<Option<T>, Resp> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| error(StatusCode::PAYLOAD_TOO_LARGE, e))?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTopic {
    #[serde(default = "one")]
    partitions: u32,
    #[serde(default)]
    config: TopicConfig,
}

fn one() -> u32 {
    1
}

async fn handle(req: Request<Incoming>, st: &AdminState) -> Resp {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let segs: Option<Vec<String>> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_segment)
        .collect();
    let Some(segs) = segs else {
        return error(StatusCode::BAD_REQUEST, "bad percent-encoding in path");
    };
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let b = &st.broker;
    match (&method, s.as_slice()) {
        (&Method::GET, ["healthz"]) => text(StatusCode::OK, "ok\n"),
        (&Method::GET, ["readyz"]) => {
            if st.ready.load(Ordering::Acquire) && b.is_running() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, ["metrics"]) => match &st.metrics {
            Some(h) => Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(h.render())))
                .unwrap_or_default(),
            None => error(StatusCode::NOT_FOUND, "metrics recorder not installed"),
        },
        (&Method::GET, ["admin", "v1", "tenants"]) => json(StatusCode::OK, &b.tenants()),
        (&Method::PUT, ["admin", "v1", "tenants", t]) => match b.create_tenant(t).await {
            Ok(()) => json(StatusCode::CREATED, &serde_json::json!({ "tenant": t })),
            Err(e) => broker_error(&e),
        },
        (&Method::DELETE, ["admin", "v1", "tenants", t]) => match b.delete_tenant(t).await {
            Ok(()) => text(StatusCode::NO_CONTENT, ""),
            Err(e) => broker_error(&e),
        },
        (&Method::GET, ["admin", "v1", "namespaces", t]) => match b.namespaces(t) {
            Ok(v) => json(
                StatusCode::OK,
                &v.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ),
            Err(e) => broker_error(&e),
        },
        (_, ["admin", "v1", "namespaces", t, n, rest @ ..]) => {
            let ns = match NamespaceName::new(t, n) {
                Ok(ns) => ns,
                Err(e) => return broker_error(&e),
            };
            match (&method, rest) {
                (&Method::GET, []) => match b.namespace_policy(&ns) {
                    Ok(p) => json(StatusCode::OK, &p),
                    Err(e) => broker_error(&e),
                },
                (&Method::PUT, []) => {
                    let policy: Option<NamespacePolicy> = match body_json(req).await {
                        Ok(p) => p,
                        Err(r) => return r,
                    };
                    match b.create_namespace(&ns, policy).await {
                        Ok(()) => json(
                            StatusCode::CREATED,
                            &serde_json::json!({ "namespace": ns.to_string() }),
                        ),
                        Err(e) => broker_error(&e),
                    }
                }
                (&Method::POST, ["policy"]) => {
                    let policy: NamespacePolicy = match body_json(req).await {
                        Ok(Some(p)) => p,
                        Ok(None) => {
                            return error(StatusCode::BAD_REQUEST, "a policy body is required")
                        }
                        Err(r) => return r,
                    };
                    match b.set_namespace_policy(&ns, policy).await {
                        Ok(()) => json(StatusCode::OK, &b.namespace_policy(&ns).ok()),
                        Err(e) => broker_error(&e),
                    }
                }
                (&Method::DELETE, []) => match b.delete_namespace(&ns).await {
                    Ok(()) => text(StatusCode::NO_CONTENT, ""),
                    Err(e) => broker_error(&e),
                },
                _ => error(StatusCode::NOT_FOUND, "no such route"),
            }
        }
        (&Method::GET, ["admin", "v1", "topics", t, n]) => match NamespaceName::new(t, n) {
            Ok(ns) => match b.namespace_policy(&ns) {
                Ok(_) => json(StatusCode::OK, &b.topics(&ns)),
                Err(e) => broker_error(&e),
            },
            Err(e) => broker_error(&e),
        },
        (_, ["admin", "v1", "topics", t, n, topic, rest @ ..]) => {
            let name = match NamespaceName::new(t, n).and_then(|ns| TopicName::new(ns, topic)) {
                Ok(x) => x,
                Err(e) => return broker_error(&e),
            };
            match (&method, rest) {
                (&Method::GET, []) => match b.topic(&name) {
                    Some(m) => json(StatusCode::OK, &m),
                    None => broker_error(&BrokerError::TopicNotFound(name.to_string())),
                },
                (&Method::GET, ["stats"]) => match b.topic_stats(&name) {
                    Ok(s) => json(StatusCode::OK, &s),
                    Err(e) => broker_error(&e),
                },
                (&Method::PUT, []) => {
                    let body: CreateTopic = match body_json(req).await {
                        Ok(Some(c)) => c,
                        Ok(None) => CreateTopic {
                            partitions: 1,
                            config: TopicConfig::default(),
                        },
                        Err(r) => return r,
                    };
                    match b.create_topic(&name, body.partitions, body.config).await {
                        Ok(m) => json(StatusCode::CREATED, &m),
                        Err(e) => broker_error(&e),
                    }
                }
                (&Method::DELETE, []) => match b.delete_topic(&name).await {
                    Ok(()) => text(StatusCode::NO_CONTENT, ""),
                    Err(e) => broker_error(&e),
                },
                _ => error(StatusCode::NOT_FOUND, "no such route"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such route"),
    }
}
