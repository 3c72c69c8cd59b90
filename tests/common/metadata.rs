//! A fake cloud metadata service on loopback, for `external-ip=auto`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the fake metadata service answers.
#[derive(Clone)]
pub enum Cloud {
    /// AWS IMDSv2: a token from `PUT /latest/api/token`, then the address
    /// only to a GET that carries it (401 without, as IMDSv2 does).
    Aws(String),
    /// GCP: the address to a GET with `Metadata-Flavor: Google` (403
    /// without); every other path 404.
    Gcp(String),
    /// Accepts connections and never answers.
    Silent,
}

/// A cloud metadata service on 127.0.0.1 (tests never send to the real
/// 169.254.169.254). Records each request as "METHOD PATH [token]".
pub struct FakeMetadata {
    pub addr: SocketAddr,
    pub cloud: Arc<Mutex<Cloud>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

pub const TOKEN: &str = "AQAEAFake-token==";

impl FakeMetadata {
    pub fn start(cloud: Cloud) -> FakeMetadata {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let cloud = Arc::new(Mutex::new(cloud));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, st) = (cloud.clone(), requests.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let cloud = c.lock().unwrap().clone();
                        if matches!(cloud, Cloud::Silent) {
                            held.push(s);
                        } else {
                            answer(s, &cloud, &r);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeMetadata {
            addr,
            cloud,
            requests,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeMetadata {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads one request and answers it as `cloud` would.
fn answer(mut s: TcpStream, cloud: &Cloud, log: &Mutex<Vec<String>>) {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (
        first.next().unwrap_or("").to_string(),
        first.next().unwrap_or("").to_string(),
    );
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let token = headers.get("x-aws-ec2-metadata-token").cloned();
    log.lock().unwrap().push(format!(
        "{method} {path}{}",
        token
            .as_ref()
            .map(|t| format!(" [{t}]"))
            .unwrap_or_default()
    ));
    let (status, body) = match cloud {
        Cloud::Aws(ip) => match (method.as_str(), path.as_str()) {
            ("PUT", "/latest/api/token")
                if headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") =>
            {
                (200, TOKEN.to_string())
            }
            ("PUT", "/latest/api/token") => (400, String::new()),
            ("GET", "/latest/meta-data/public-ipv4") if token.as_deref() == Some(TOKEN) => {
                (200, ip.clone())
            }
            ("GET", "/latest/meta-data/public-ipv4") => (401, String::new()),
            _ => (404, String::new()),
        },
        Cloud::Gcp(ip) => {
            let path_ok = path
                == "/computeMetadata/v1/instance/network-interfaces/0/access-configs/0/external-ip";
            match (path_ok, headers.get("metadata-flavor").map(String::as_str)) {
                (true, Some("Google")) => (200, ip.clone()),
                (true, _) => (403, String::new()),
                _ => (404, String::new()),
            }
        }
        Cloud::Silent => unreachable!(),
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
