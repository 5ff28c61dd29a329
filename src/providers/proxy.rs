//! Upstream connections through the proxy the environment names, as curl reads it:
//! `HTTPS_PROXY` for `https://` upstreams, `HTTP_PROXY` for `http://` ones, `ALL_PROXY` for
//! both, `NO_PROXY` for hosts to reach directly (each also in lower case).
//!
//! Why here: the upstream client is hyper-util's, which, unlike reqwest, reads no proxy
//! settings by itself, and a service in a network whose only way out is a proxy must still
//! reach its providers. Every proxied connection is a `CONNECT` tunnel, also for `http://`
//! upstreams (reqwest sent those to the proxy as absolute-form requests instead): one way
//! for both, and the request never changes shape. A proxy that refuses `CONNECT` to port 80
//! (squid's default) then refuses plain-HTTP upstreams; those are usually local model
//! servers, which belong in `NO_PROXY`. The proxy itself is spoken to in plain HTTP; TLS to
//! the upstream runs inside the tunnel.

use std::{future::Future, pin::Pin, sync::Arc, task::Poll};

use http::Uri;
use hyper_util::{
    client::{
        legacy::connect::{HttpConnector, proxy::Tunnel},
        proxy::matcher::Matcher,
    },
    rt::TokioIo,
};
use tokio::net::TcpStream;
use tower::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// TCP to the upstream, or through a `CONNECT` tunnel of the proxy configured for it.
#[derive(Clone)]
pub struct ProxyConnector {
    matcher: Arc<Matcher>,
    direct: HttpConnector,
}

impl ProxyConnector {
    /// Proxies as `matcher` says; `direct` makes the TCP connections (to the upstream, or to
    /// the proxy).
    pub fn new(direct: HttpConnector, matcher: Matcher) -> Self {
        ProxyConnector {
            matcher: Arc::new(matcher),
            direct,
        }
    }

    /// Proxies as the process environment says (read once, here).
    pub fn from_env(direct: HttpConnector) -> Self {
        ProxyConnector::new(direct, Matcher::from_env())
    }

    /// Whether calls to `upstream` go through a proxy.
    pub fn proxies(&self, upstream: &Uri) -> bool {
        self.matcher.intercept(upstream).is_some()
    }
}

impl Service<Uri> for ProxyConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each call clones the connector it uses, which is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let Some(proxy) = self.matcher.intercept(&dst) else {
            let mut direct = self.direct.clone();
            return Box::pin(async move { direct.call(dst).await.map_err(Into::into) });
        };
        let mut tunnel = Tunnel::new(proxy.uri().clone(), self.direct.clone());
        if let Some(auth) = proxy.basic_auth() {
            tunnel = tunnel.with_auth(auth.clone());
        }
        let dst = with_port(dst);
        Box::pin(async move { tunnel.call(dst).await.map_err(Into::into) })
    }
}

/// `dst` with its port written out: the tunnel asks for port 443 when the address names
/// none, which is wrong for `http://host/`.
fn with_port(dst: Uri) -> Uri {
    if dst.port().is_some() {
        return dst;
    }
    let port = if dst.scheme_str() == Some("http") {
        80
    } else {
        443
    };
    let (Some(scheme), Some(host)) = (dst.scheme_str(), dst.host()) else {
        return dst;
    };
    // A host from a valid `Uri` with a port added is a valid authority; should it not be,
    // the address stays as it was.
    format!("{scheme}://{host}:{port}/").parse().unwrap_or(dst)
}

#[cfg(test)]
#[expect(
    clippy::disallowed_methods,
    reason = "the test servers' tasks end with the test's runtime"
)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
        net::TcpListener,
    };

    use super::*;

    /// An upstream that answers every request on a connection with `200 upstream`.
    async fn upstream() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let _ = socket.read(&mut buf).await;
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nupstream")
                        .await;
                });
            }
        });
        port
    }

    /// A `CONNECT` proxy that keeps the head of every request it is sent.
    async fn proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let kept = Arc::clone(&kept);
                tokio::spawn(async move {
                    let mut reader = BufReader::new(socket);
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    kept.lock().unwrap().push(head.clone());
                    let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let mut client = reader.into_inner();
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    let _ = client.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        (port, seen)
    }

    async fn get(connector: ProxyConnector, url: &str) -> (u16, String) {
        let client: Client<_, Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build(connector);
        let response = client.get(url.parse().unwrap()).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_proxied_upstream_is_reached_through_a_connect_tunnel_with_credentials() {
        let target = upstream().await;
        let (proxy_port, seen) = proxy().await;
        let matcher = Matcher::builder()
            .http(format!("http://user:s3cret@127.0.0.1:{proxy_port}"))
            .build();
        let connector = ProxyConnector::new(HttpConnector::new(), matcher);
        let url = format!("http://127.0.0.1:{target}/v1/chat/completions");
        assert!(connector.proxies(&url.parse().unwrap()));
        assert_eq!(get(connector, &url).await, (200, "upstream".into()));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with(&format!("CONNECT 127.0.0.1:{target} HTTP/1.1\r\n")),
            "{seen:?}"
        );
        // base64("user:s3cret")
        assert!(
            seen[0].contains("Proxy-Authorization: Basic dXNlcjpzM2NyZXQ=\r\n"),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn no_proxy_hosts_and_unconfigured_schemes_are_reached_directly() {
        let target = upstream().await;
        let (proxy_port, seen) = proxy().await;
        let url = format!("http://127.0.0.1:{target}/v1/models");
        let exempt = Matcher::builder()
            .all(format!("http://127.0.0.1:{proxy_port}"))
            .no("127.0.0.1")
            .build();
        let https_only = Matcher::builder()
            .https(format!("http://127.0.0.1:{proxy_port}"))
            .build();
        for matcher in [exempt, https_only] {
            let connector = ProxyConnector::new(HttpConnector::new(), matcher);
            assert!(!connector.proxies(&url.parse().unwrap()));
            assert_eq!(get(connector, &url).await, (200, "upstream".into()));
        }
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn the_tunnel_is_asked_for_the_scheme_s_port() {
        let port = |s: &str| with_port(s.parse().unwrap()).port_u16();
        assert_eq!(port("http://api.example/v1"), Some(80));
        assert_eq!(port("https://api.example/v1"), Some(443));
        assert_eq!(port("http://api.example:8000/v1"), Some(8000));
        assert_eq!(
            with_port("https://[::1]/x".parse().unwrap()).to_string(),
            "https://[::1]:443/"
        );
    }
}
