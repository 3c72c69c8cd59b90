//! A plain HTTP/1.1 client for the few requests the daemon makes itself:
//! cloud metadata services (`external-ip=auto`) and the server's own health
//! endpoints (`--health-check`, `--drain`). No TLS: both are local.

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// One HTTP/1.1 request to `host:port` (a name or an address); the status
/// and the body, trimmed (at most 4 KiB is kept). Errors: connecting or the
/// exchange failed. The caller bounds the time.
pub async fn request(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let host_header = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("Host", host_header)
        .header(
            "User-Agent",
            concat!("turnserver/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string());
    let result = match resp {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            let body = &body[..body.len().min(4096)];
            Ok((status, String::from_utf8_lossy(body).trim().to_string()))
        }
        Err(e) => Err(e),
    };
    conn.abort();
    result
}
