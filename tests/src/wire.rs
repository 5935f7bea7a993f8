//! Reading traffic off the wire: a recording TCP relay to put between two
//! proxies, and a parser that checks recorded bytes are TLS records.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The bytes of one relayed connection, per direction.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// From the connecting side (the client's proxy) to the target.
    pub upstream: Vec<u8>,
    /// From the target back to the connecting side.
    pub downstream: Vec<u8>,
}

/// Accepts on 127.0.0.1, connects each connection onward to the target, and
/// copies both ways while appending every byte to that connection's record.
#[derive(Debug)]
pub struct RecordingRelay {
    addr: SocketAddr,
    target: watch::Sender<Option<SocketAddr>>,
    records: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>,
    task: JoinHandle<()>,
}

impl RecordingRelay {
    /// Listens now; connections wait until [`RecordingRelay::forward_to`]
    /// names the target (so a proxy can be told to advertise the relay
    /// before it exists).
    pub async fn start() -> RecordingRelay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the relay");
        let addr = listener.local_addr().expect("the relay's address");
        let (target, target_rx) = watch::channel(None);
        let records: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>> = Arc::default();
        let task = tokio::spawn({
            let records = records.clone();
            async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let record = Arc::new(Mutex::new(Recorded::default()));
                    records.lock().unwrap().push(record.clone());
                    let mut target_rx = target_rx.clone();
                    tokio::spawn(async move {
                        let target = match target_rx.wait_for(Option::is_some).await {
                            Ok(target) => target.expect("checked"),
                            Err(_) => return,
                        };
                        let Ok(outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let (in_rd, in_wr) = inbound.into_split();
                        let (out_rd, out_wr) = outbound.into_split();
                        let up = copy_recording(in_rd, out_wr, record.clone(), true);
                        let down = copy_recording(out_rd, in_wr, record, false);
                        tokio::join!(up, down);
                    });
                }
            }
        });
        RecordingRelay {
            addr,
            target,
            records,
            task,
        }
    }

    /// Where peers should dial: the relay's listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn forward_to(&self, target: SocketAddr) {
        self.target.send_replace(Some(target));
    }

    /// Every connection relayed so far, in accept order.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.lock().unwrap().clone())
            .collect()
    }
}

impl Drop for RecordingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn copy_recording(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<Mutex<Recorded>>,
    upstream: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut r = record.lock().unwrap();
            let side = if upstream {
                &mut r.upstream
            } else {
                &mut r.downstream
            };
            side.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// One TLS record header: content type and payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub content_type: u8,
    pub version: u16,
    pub len: usize,
}

pub const CHANGE_CIPHER_SPEC: u8 = 20;
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Splits `bytes` into TLS records (a last, partial record is allowed: the
/// recording may end mid-record). Errors if anything is not a record.
pub fn tls_records(bytes: &[u8]) -> Result<Vec<RecordHeader>, String> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + 5) else {
            break; // partial header at the end
        };
        let content_type = head[0];
        let version = u16::from_be_bytes([head[1], head[2]]);
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        if !(CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&content_type) {
            return Err(format!(
                "byte {at}: content type {content_type} is not a TLS record"
            ));
        }
        if !(0x0301..=0x0303).contains(&version) {
            return Err(format!(
                "byte {at}: record version {version:#06x} is not TLS"
            ));
        }
        // TLS 1.3: at most 2^14 + 256 bytes of ciphertext per record.
        if len > (1 << 14) + 256 {
            return Err(format!("byte {at}: record length {len} is too long"));
        }
        records.push(RecordHeader {
            content_type,
            version,
            len,
        });
        at += 5 + len;
    }
    Ok(records)
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_split_and_garbage_is_refused() {
        let mut bytes = vec![22, 3, 1, 0, 2, 0xaa, 0xbb, 23, 3, 3, 0, 1, 0xcc];
        let recs = tls_records(&bytes).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].content_type, HANDSHAKE);
        assert_eq!(recs[1].len, 1);
        bytes.extend_from_slice(&[23, 3]); // a partial header at the end
        assert_eq!(tls_records(&bytes).unwrap().len(), 2);
        assert!(tls_records(b"GET / HTTP/1.1\r\n").is_err());
        assert!(contains(b"abcdef", b"cde"));
        assert!(!contains(b"abcdef", b"xyz"));
    }
}
