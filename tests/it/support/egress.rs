//! A real egress proxy for tests: CONNECT tunnels (for an `https://` Unleash) and plain forwarding of
//! absolute-form requests (for an `http://` one), optionally requiring Basic credentials. It records the
//! first request line of each connection and the credentials it was shown.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct EgressProxy {
    pub addr: SocketAddr,
    /// `CONNECT host:port HTTP/1.1` or `GET http://host:port/path HTTP/1.1`, per connection.
    lines: Arc<Mutex<Vec<String>>>,
    /// The `Proxy-Authorization` each connection carried.
    auths: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EgressProxy {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
    pub fn auths(&self) -> Vec<Option<String>> {
        self.auths.lock().unwrap().clone()
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the proxy; with `credentials` (`user:password`), a request without them gets 407.
pub async fn egress_proxy(credentials: Option<&str>) -> EgressProxy {
    use base64::Engine as _;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let auths = Arc::new(Mutex::new(Vec::new()));
    let want = credentials.map(|c| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(c)));
    let (l, a) = (lines.clone(), auths.clone());
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (l, a, want) = (l.clone(), a.clone(), want.clone());
            tokio::spawn(async move {
                let _ = serve(client, &l, &a, want.as_deref()).await;
            });
        }
    });
    EgressProxy {
        addr,
        lines,
        auths,
        task,
    }
}

async fn serve(
    mut client: TcpStream,
    lines: &Mutex<Vec<String>>,
    auths: &Mutex<Vec<Option<String>>>,
    want: Option<&str>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let line = text.lines().next().unwrap_or("").to_string();
    let auth = text
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("proxy-authorization"))
        })
        .map(|(_, v)| v.trim().to_string());
    lines.lock().unwrap().push(line.clone());
    auths.lock().unwrap().push(auth.clone());
    if want.is_some() && auth.as_deref() != want {
        client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    }
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method == "CONNECT" {
        let mut upstream = TcpStream::connect(target).await?;
        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    } else {
        // Absolute form: the origin is in the target; pass the request on as it came.
        let authority = target.trim_start_matches("http://").split('/').next().unwrap_or("");
        let mut upstream = TcpStream::connect(authority).await?;
        upstream.write_all(&head).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    }
    Ok(())
}
