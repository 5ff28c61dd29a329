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

/// The tunnel itself, credentials and `NO_PROXY` are tested end to end, through a real
/// `duet serve` and a `CONNECT` proxy: `tests/api/egress_proxy.rs`.
#[cfg(test)]
mod tests {
    use super::*;

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
