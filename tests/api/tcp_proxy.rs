//! A loopback TCP proxy that can make the connections it carries go silent without closing
//! them: what a client sees of a server lost behind a dead host or a dropped route, where no
//! reset ever arrives.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards every connection to `target` until [`StallingProxy::stall_existing`].
pub struct StallingProxy {
    pub addr: SocketAddr,
    /// Bumped by each stall; a connection accepted before the bump goes silent.
    generation: watch::Sender<u64>,
}

impl StallingProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let (generation, watcher) = watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watcher = watcher.clone();
                let born = *watcher.borrow();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = async { watcher.wait_for(|now| *now > born).await.is_ok() } => {
                            // Silent from now on, yet open: both ends stay held.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        Self { addr, generation }
    }

    /// Every connection open now stops carrying bytes either way, without being closed; new
    /// connections are carried as before.
    pub fn stall_existing(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}
