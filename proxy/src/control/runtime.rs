//! The proxy's two runtimes, as ztunnel splits them:
//!
//! - the **data plane** (`remora-data`): every proxied connection and request.
//!   With one worker (the default, what a sidecar with a one-core limit gets)
//!   it is a current-thread runtime on a thread of its own: no work-stealing
//!   queues, no atomics on each task wake, no cross-thread hand-offs. With
//!   `--workers N` it is a multi-thread runtime of N workers;
//! - the **control side**, on the thread that called [`DataPlane::start`]:
//!   discovery, identity, the admin and health endpoints, drain. A busy data
//!   path cannot starve a readiness probe or a configuration push, and a slow
//!   control-plane call never sits in front of a request.
//!
//! Listeners for the data plane are bound here as std sockets and registered
//! with the data plane's reactor inside it, so their readiness is delivered
//! where their connections are served.

use anyhow::Context;
use std::future::Future;
use std::net::SocketAddr;
use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::oneshot;

/// The data plane's runtime, and how to stop it.
pub struct DataPlane {
    handle: Handle,
    /// Current-thread: the thread that drives it, and the signal that ends it.
    driver: Option<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
    /// Multi-thread: the runtime itself (its workers drive it).
    runtime: Option<Runtime>,
}

impl DataPlane {
    /// Starts the data plane with `workers` threads (at least one).
    pub fn start(workers: usize) -> anyhow::Result<DataPlane> {
        if workers <= 1 {
            let rt = Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the data-plane runtime")?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name("remora-data".into())
                .spawn(move || {
                    rt.block_on(async move {
                        let _ = stopped.await;
                    });
                })
                .context("starting the data-plane thread")?;
            return Ok(DataPlane {
                handle,
                driver: Some((stop, thread)),
                runtime: None,
            });
        }
        let rt = Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("remora-data")
            .enable_all()
            .build()
            .context("starting the data-plane runtime")?;
        Ok(DataPlane {
            handle: rt.handle().clone(),
            driver: None,
            runtime: Some(rt),
        })
    }

    /// Runs `fut` on the data plane.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        drop(self.handle.spawn(fut));
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.driver.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// How many data-plane workers `--workers` asks for: 0 means one per core this
/// process may run on.
pub fn workers(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A listening socket for the data plane (SO_REUSEADDR, as tokio's own bind),
/// registered with a reactor later by [`tokio::net::TcpListener::from_std`].
pub fn bind_std(addr: SocketAddr, what: &str) -> anyhow::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind = || -> std::io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    bind().with_context(|| format!("cannot listen on {addr} ({what})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn a_listener_bound_here_serves_on_the_data_plane_and_stops_with_it() {
        for workers in [1, 2] {
            let data = DataPlane::start(workers).unwrap();
            let l = bind_std("127.0.0.1:0".parse().unwrap(), "test").unwrap();
            let addr = l.local_addr().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            data.spawn(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                let (mut s, _) = l.accept().await.unwrap();
                let name = std::thread::current().name().map(str::to_owned);
                s.write_all(b"hi").await.unwrap();
                tx.send(name).unwrap();
            });
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            let mut buf = [0u8; 2];
            std::io::Read::read_exact(&mut c, &mut buf).unwrap();
            assert_eq!(&buf, b"hi");
            let name = rx.recv().unwrap();
            assert_eq!(name.as_deref(), Some("remora-data"), "workers={workers}");
            drop(data);
        }
    }

    #[test]
    fn zero_workers_means_one_per_core() {
        assert!(workers(0) >= 1);
        assert_eq!(workers(3), 3);
    }

    #[tokio::test]
    async fn bind_std_refuses_a_port_in_use() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let err = bind_std(addr, "inbound").unwrap_err();
        assert!(format!("{err:#}").contains("(inbound)"), "{err:#}");
    }
}
