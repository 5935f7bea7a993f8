//! Whether the local application can be reached. An instance whose
//! application is gone (crashed, killed, not listening) must stop being an
//! endpoint while its sidecar lives on, or every peer keeps sending it
//! requests only to get 502s back.
//!
//! Two signals: a failed connect to the application on the inbound path
//! (passive, immediate), and a probe (`--app-probe`: a TCP connect, or an HTTP
//! GET such as the pod's own readiness path) every `--app-probe-interval`.
//! Not serving is reported to the control plane, which withdraws the
//! endpoint; the probe keeps trying (every second while down) and the
//! endpoint comes back with the application.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// How the application is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Only failed requests mark it down; recovery is still probed by TCP.
    Passive,
    Tcp,
    /// `GET PATH`; a 2xx or 3xx answer is serving.
    Http(String),
}

impl std::str::FromStr for Probe {
    type Err = String;

    fn from_str(s: &str) -> Result<Probe, String> {
        match s {
            "none" | "passive" => Ok(Probe::Passive),
            "tcp" => Ok(Probe::Tcp),
            _ => match s.strip_prefix("http:") {
                Some(path) if path.starts_with('/') => Ok(Probe::Http(path.to_owned())),
                _ => Err(format!(
                    "{s:?}: expected tcp, none, or http:/PATH (e.g. http:/healthz)"
                )),
            },
        }
    }
}

/// The application's state as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    pub serving: bool,
    pub reason: String,
}

#[derive(Debug)]
pub struct AppHealth {
    state: watch::Sender<Serving>,
}

impl Default for AppHealth {
    fn default() -> Self {
        AppHealth {
            state: watch::Sender::new(Serving {
                serving: true,
                reason: String::new(),
            }),
        }
    }
}

impl AppHealth {
    /// A request could not reach the application.
    pub fn unreachable(&self, reason: &str) {
        self.set(false, reason);
    }

    pub fn is_serving(&self) -> bool {
        self.state.borrow().serving
    }

    pub fn subscribe(&self) -> watch::Receiver<Serving> {
        self.state.subscribe()
    }

    fn set(&self, serving: bool, reason: &str) {
        self.state.send_if_modified(|s| {
            if s.serving == serving {
                return false;
            }
            if serving {
                tracing::info!("the application is reachable again");
            } else {
                tracing::warn!(%reason, "the application is unreachable; withdrawing this endpoint");
            }
            *s = Serving {
                serving,
                reason: reason.to_owned(),
            };
            true
        });
    }
}

/// How, how often and where the application is probed.
#[derive(Debug, Clone)]
pub struct AppProbe {
    /// `--app-probe`.
    pub probe: Probe,
    /// `--app-probe-interval`, while the application serves.
    pub interval: Duration,
    /// Each probe's connect time.
    pub timeout: Duration,
    pub target: SocketAddr,
}

/// Probes the application until the process ends, keeping `health` up to date.
pub async fn run(health: &AppHealth, app: AppProbe) {
    let AppProbe {
        probe,
        interval,
        timeout,
        target,
    } = app;
    let mut failures = 0u32;
    loop {
        let serving = health.is_serving();
        if serving && probe == Probe::Passive {
            // Nothing to do until a request fails.
            let mut changes = health.subscribe();
            let _ = changes.changed().await;
            continue;
        }
        tokio::time::sleep(if serving {
            interval
        } else {
            Duration::from_secs(1)
        })
        .await;
        match check(&probe, target, timeout).await {
            Ok(()) => {
                failures = 0;
                health.set(true, "");
            }
            Err(reason) => {
                failures += 1;
                // Two misses in a row, so one slow accept does not withdraw it.
                if failures >= 2 || !health.is_serving() {
                    health.unreachable(&reason);
                }
            }
        }
    }
}

async fn check(probe: &Probe, target: SocketAddr, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect {target}: {e}"))?;
        let Probe::Http(path) = probe else {
            return Ok(());
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("probe {path}: {e}"))?;
        let mut head = [0u8; 12];
        stream
            .read_exact(&mut head)
            .await
            .map_err(|e| format!("probe {path}: {e}"))?;
        match head.get(9) {
            Some(b'2' | b'3') => Ok(()),
            _ => Err(format!(
                "probe {path}: {}",
                String::from_utf8_lossy(&head).trim()
            )),
        }
    };
    tokio::time::timeout(timeout.max(Duration::from_secs(1)), attempt)
        .await
        .unwrap_or_else(|_| Err(format!("probe of {target} timed out")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse() {
        assert_eq!("tcp".parse(), Ok(Probe::Tcp));
        assert_eq!("none".parse(), Ok(Probe::Passive));
        assert_eq!("http:/healthz".parse(), Ok(Probe::Http("/healthz".into())));
        assert!("http:healthz".parse::<Probe>().is_err());
        assert!("udp".parse::<Probe>().is_err());
    }

    #[tokio::test]
    async fn a_listening_app_passes_and_a_closed_port_fails() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = Duration::from_secs(1);
        assert_eq!(check(&Probe::Tcp, addr, t).await, Ok(()));
        drop(listener);
        assert!(check(&Probe::Tcp, addr, t).await.is_err());
    }

    #[tokio::test]
    async fn an_http_probe_reads_the_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let probe = Probe::Http("/ready".into());
        let t = Duration::from_secs(1);
        assert_eq!(check(&probe, addr, t).await, Ok(()));
        assert!(check(&probe, addr, t).await.unwrap_err().contains("503"));
    }

    #[test]
    fn passive_reports_flip_the_state_once() {
        let h = AppHealth::default();
        let mut rx = h.subscribe();
        h.unreachable("connect refused");
        assert!(!h.is_serving());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        h.unreachable("again");
        assert!(!rx.has_changed().unwrap(), "no second report while down");
        h.set(true, "");
        assert!(h.is_serving());
    }
}
