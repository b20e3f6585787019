//! [`Application`]: builds the state, binds the listeners, serves until told to stop, drains.
//!
//! `Application::build` binds before serving, so tests can ask for port 0 and read the real port
//! with [`Application::port`]; `run_until_stopped` takes the shutdown trigger as a future, so tests
//! stop an instance without signals.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::ClientRegistry;
use crate::cache::{Clock, CredentialsCache};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::partner::{ClientBuildError, SkypostalClient};
use crate::routes;
use crate::shared::SharedTier;

/// Shared handles given to every handler: one reference count to clone per request.
#[derive(Clone)]
pub struct AppState(Arc<AppShared>);

impl std::ops::Deref for AppState {
    type Target = AppShared;

    fn deref(&self) -> &AppShared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct AppShared {
    /// The credentials cache and, behind it, the partner client.
    pub cache: CredentialsCache,
    /// The configured callers.
    pub clients: Arc<ClientRegistry>,
    /// Whether the instance is draining.
    pub readiness: Readiness,
    /// This instance's metrics.
    pub metrics: Arc<Metrics>,
}

impl AppShared {
    /// Applies a re-read configuration's callers and partner app key (SIGHUP: key rotation
    /// without downtime). Other settings take effect at the next restart.
    pub fn reload(&self, settings: &Settings) {
        let clients = self.clients.reload(settings);
        self.cache
            .partner()
            .set_app_key(settings.upstream.app_key.clone());
        tracing::info!(
            clients,
            "configuration reloaded: callers and partner app key swapped"
        );
    }
}

/// Readiness: turns to draining when shutdown starts.
#[derive(Debug, Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    /// Whether shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// Why the application could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} (`{key}`): {source}")]
    Bind {
        /// The config key of the listener.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The partner client could not be built.
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    /// The shared tier could not be set up (its URL or TLS settings).
    #[error("the shared tier could not be set up (`redis.url`): {0}")]
    SharedTier(String),
    /// A listener failed while serving.
    #[error("the server failed: {0}")]
    Serve(std::io::Error),
    /// In-flight requests were still running when `server.shutdown_grace_s` ran out.
    #[error("in-flight requests were cut off after the {0:?} shutdown grace period")]
    GraceExceeded(Duration),
}

/// A bound, ready-to-run instance of the service.
pub struct Application {
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    router: Router,
    admin_router: Router,
    state: AppState,
    drain_delay: Duration,
    shutdown_grace: Duration,
}

impl Application {
    /// Builds the state and binds the listeners, with the system clock.
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        Self::build_with_clock(settings, Clock::system()).await
    }

    /// Builds with a given freshness clock (tests move a manual clock instead of sleeping).
    pub async fn build_with_clock(settings: &Settings, clock: Clock) -> Result<Self, StartupError> {
        let mut metrics = Metrics::new();
        let shared = match &settings.redis {
            Some(redis) => Some(
                SharedTier::new(
                    redis,
                    settings.upstream.max_rps,
                    settings.upstream.deadline,
                    metrics.register_shared_tier(),
                )
                .map_err(|e| StartupError::SharedTier(e.to_string()))?,
            ),
            None => None,
        };
        let metrics = Arc::new(metrics);
        let partner = SkypostalClient::new(
            &settings.upstream,
            clock.clone(),
            metrics.clone(),
            shared.clone(),
        )?;
        let cache = CredentialsCache::new(&settings.cache, partner, clock, shared.clone());
        if let Some(shared) = &shared {
            shared.start(cache.purge_listener()).await;
        }
        let state = AppState(Arc::new(AppShared {
            metrics,
            cache,
            clients: Arc::new(ClientRegistry::from_settings(settings)),
            readiness: Readiness::default(),
        }));
        let listener = bind("server.listen", settings.server.listen).await?;
        let admin_listener = match settings.server.admin_listen {
            Some(addr) => Some(bind("server.admin_listen", addr).await?),
            None => None,
        };
        let timeout = settings.server.request_timeout;
        // /metrics moves to the admin listener when there is one.
        let metrics_on_main = admin_listener.is_none();
        Ok(Self {
            router: routes::router(state.clone(), timeout, metrics_on_main),
            admin_router: routes::admin_router(state.clone(), timeout),
            listener,
            admin_listener,
            state,
            drain_delay: settings.server.drain_delay,
            shutdown_grace: settings.server.shutdown_grace,
        })
    }

    /// The bound port of the main listener.
    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// The bound address of the main listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The bound address of the admin listener, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The shared state (tests inspect the cache through it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains: readiness turns 503 for `drain_delay`, the
    /// listeners close, and in-flight requests get `shutdown_grace` to finish.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut servers = tokio::task::JoinSet::new();
        servers.spawn(serve(self.listener, self.router, stop_rx.clone()));
        if let Some(admin) = self.admin_listener {
            servers.spawn(serve(admin, self.admin_router, stop_rx));
        }

        tokio::select! {
            () = shutdown => {}
            Some(result) = servers.join_next() => {
                // A server only ends early on an error.
                return match result {
                    Ok(Err(e)) => Err(StartupError::Serve(e)),
                    _ => Err(StartupError::Serve(std::io::Error::other("listener stopped"))),
                };
            }
        }

        self.state.readiness.start_draining();
        tracing::info!(
            drain_delay_s = self.drain_delay.as_secs(),
            "shutdown requested: readiness is now 503"
        );
        tokio::time::sleep(self.drain_delay).await;
        let _ = stop_tx.send(true);
        tracing::info!(
            grace_s = self.shutdown_grace.as_secs(),
            "listeners closed: waiting for in-flight requests"
        );

        let drained = tokio::time::timeout(self.shutdown_grace, async {
            while let Some(result) = servers.join_next().await {
                if let Ok(Err(e)) = result {
                    return Err(StartupError::Serve(e));
                }
            }
            Ok(())
        })
        .await;
        match drained {
            Ok(result) => {
                tracing::info!("shutdown complete");
                result
            }
            Err(_) => Err(StartupError::GraceExceeded(self.shutdown_grace)),
        }
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { key, addr, source })
}

async fn serve(
    listener: TcpListener,
    router: Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        // Answers are small: send them at once rather than waiting to coalesce.
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        })
        .await
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
