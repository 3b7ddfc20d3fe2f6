//! [`KillableProxy`]: a TCP forwarder whose connections a test can cut at once, to make the
//! server behind it look crashed to its peers while the server itself keeps running.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::isolated::{Isolated, spawn_isolated};

/// A TCP forwarder on 127.0.0.1 in front of `target`: each accepted connection is piped to a
/// new connection to `target`. [`kill_connections`](Self::kill_connections) drops every pair
/// without a close frame or any other goodbye, like a crash of the server behind it; new
/// connections are forwarded again afterwards.
pub struct KillableProxy {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    kill: watch::Sender<u64>,
    // Dropping it stops the proxy, and with it every connection.
    _running: Isolated,
}

impl KillableProxy {
    /// Starts forwarding from a free port to `target`. The proxy runs apart from the test's
    /// tasks ([`spawn_isolated`]), so its hops don't queue behind them.
    pub fn start(target: SocketAddr) -> KillableProxy {
        Self::on_listener(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), target)
    }

    /// Like [`KillableProxy::start`], forwarding from `listener` (an address of the test's
    /// choosing).
    pub fn on_listener(listener: std::net::TcpListener, target: SocketAddr) -> KillableProxy {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (kill, kill_rx) = watch::channel(0u64);
        let counter = accepted.clone();
        let running = spawn_isolated(move || async move {
            let listener = TcpListener::from_std(listener).unwrap();
            forward_all(listener, target, counter, kill_rx).await;
        });
        KillableProxy {
            addr,
            accepted,
            kill,
            _running: running,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT`: the URL to give peers instead of the target's.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Drops every connection forwarded so far, on both sides, abruptly.
    pub fn kill_connections(&self) {
        self.kill.send_modify(|generation| *generation += 1);
    }
}

async fn forward_all(
    listener: TcpListener,
    target: SocketAddr,
    accepted: Arc<AtomicUsize>,
    kill: watch::Receiver<u64>,
) {
    let mut pipes = JoinSet::new();
    loop {
        tokio::select! {
            incoming = listener.accept() => {
                let Ok((tcp, _)) = incoming else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                // Only kills from now on end this connection.
                let mut kill = kill.clone();
                kill.borrow_and_update();
                pipes.spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                    let mut inbound = tcp;
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = kill.changed() => {}
                    }
                });
            }
            Some(_) = pipes.join_next(), if !pipes.is_empty() => {}
        }
    }
}
