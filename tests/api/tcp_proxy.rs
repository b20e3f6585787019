//! A loopback TCP proxy that can make the connections it carries go silent without closing
//! them: what a client sees of a server lost behind a dead host or a dropped route, where no
//! reset ever arrives.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with connections.
#[derive(Clone, Copy)]
struct State {
    /// Bumped by each stall; a connection accepted before the bump goes silent.
    generation: u64,
    /// New connections are silent from the start too.
    all: bool,
}

/// Forwards every connection to `target` until told to stall.
pub struct StallingProxy {
    pub addr: SocketAddr,
    state: watch::Sender<State>,
}

impl StallingProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let (state, watcher) = watch::channel(State {
            generation: 0,
            all: false,
        });
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watcher = watcher.clone();
                let born = *watcher.borrow();
                tokio::spawn(async move {
                    if born.all {
                        // Accepted, then never answered (the task holds the socket).
                        std::future::pending::<()>().await;
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let stalled = async {
                        let _ = watcher
                            .wait_for(|now| now.generation > born.generation)
                            .await;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = stalled => {
                            // Silent from now on, yet open: both ends stay held.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        Self { addr, state }
    }

    /// Every connection open now stops carrying bytes either way, without being closed; new
    /// connections are carried as before.
    pub fn stall_existing(&self) {
        self.state.send_modify(|s| s.generation += 1);
    }

    /// Every connection, open now or made until [`Self::resume`], is silent.
    pub fn stall_all(&self) {
        self.state.send_modify(|s| {
            s.generation += 1;
            s.all = true;
        });
    }

    /// New connections are carried again (those stalled stay silent).
    pub fn resume(&self) {
        self.state.send_modify(|s| s.all = false);
    }
}
