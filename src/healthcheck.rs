//! `duet healthcheck`: one `GET /healthz` to a running `duet serve`, for container health
//! checks in an image that has no curl, wget or shell (deploy/Dockerfile).
//!
//! Plain HTTP/1.1 over a TCP connection, written by hand: the probe runs every few seconds
//! for the container's whole life, and needs nothing of an HTTP client's pools, TLS or
//! redirects.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why the probe failed; the message is the one line `duet healthcheck` prints.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("BIND_ADDR: {0:?} is not an address like 0.0.0.0:8080")]
    BadAddress(String),
    #[error(
        "BIND_ADDR has port 0 (a free port chosen at start): pass the port it chose with --addr"
    )]
    PortZero,
    #[error("GET http://{addr}/healthz: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("GET http://{addr}/healthz: no answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("GET http://{addr}/healthz answered {status:?}, not 200")]
    Status { addr: SocketAddr, status: String },
}

/// The address to probe for a service listening on `bind_addr` (`BIND_ADDR`'s syntax): an
/// unspecified address (`0.0.0.0`, `::`) is reached on the loopback of its family.
pub fn probe_addr(bind_addr: &str) -> Result<SocketAddr, HealthcheckError> {
    let mut addr: SocketAddr = bind_addr
        .trim()
        .parse()
        .map_err(|_| HealthcheckError::BadAddress(bind_addr.to_owned()))?;
    if addr.port() == 0 {
        return Err(HealthcheckError::PortZero);
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
}

/// GETs `/healthz` at `addr`; `Ok` on a 200, within `timeout` for the whole exchange.
pub async fn check(addr: SocketAddr, timeout: Duration) -> Result<(), HealthcheckError> {
    match tokio::time::timeout(timeout, get_status(addr)).await {
        Err(_) => Err(HealthcheckError::Timeout { addr, timeout }),
        Ok(Err(source)) => Err(HealthcheckError::Io { addr, source }),
        Ok(Ok(status)) if status.split(' ').nth(1) == Some("200") => Ok(()),
        Ok(Ok(status)) => Err(HealthcheckError::Status { addr, status }),
    }
}

/// The status line of `GET /healthz`, without its line ending.
async fn get_status(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: duet-healthcheck\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // The status line fits in the first read of any real answer; 256 bytes bound what a
    // wrong server on the port can make us hold.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 256 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    Ok(String::from_utf8_lossy(line).trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_probed_on_loopback() {
        assert_eq!(
            probe_addr("0.0.0.0:8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(probe_addr("[::]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert_eq!(
            probe_addr("10.1.2.3:9000").unwrap(),
            "10.1.2.3:9000".parse().unwrap()
        );
        assert!(matches!(
            probe_addr("127.0.0.1:0"),
            Err(HealthcheckError::PortZero)
        ));
        assert!(matches!(
            probe_addr("localhost:8080"),
            Err(HealthcheckError::BadAddress(_))
        ));
    }
}
