//! A real `redis-server` for the shared-tier tests: one per test, on its own loopback port, with
//! persistence off, so tests share nothing and leave nothing behind.
//!
//! The binary is `redis-server` on `PATH`, or `$REDIS_SERVER`; `.ci/run` installs it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::helpers::eventually;

/// A running (or stopped, to be restarted) Redis.
pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts Redis on a free loopback port and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts Redis requiring this password (`requirepass`).
    pub async fn start_with_password(password: &str) -> Self {
        Self::start_with(Some(password.to_owned())).await
    }

    async fn start_with(password: Option<String>) -> Self {
        // The kernel names a free port; Redis binds it a moment later.
        let port = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = Self {
            port,
            password,
            child: None,
        };
        server.restart().await;
        server
    }

    /// `redis://[:password@]127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// `redis://USER:PASSWORD@127.0.0.1:PORT`, for an ACL user.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// Runs one command as the default user and returns its answer.
    pub async fn command(&self, args: &[&str]) -> redis::Value {
        let mut conn = self.connection().await;
        let (name, rest) = args.split_first().expect("a command");
        redis::cmd(name)
            .arg(rest)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// Starts Redis again on the same port (empty: nothing persists).
    pub async fn restart(&mut self) {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let password = self
            .password
            .iter()
            .flat_map(|p| ["--requirepass".to_owned(), p.clone()]);
        let child = Command::new(&binary)
            .args(password)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary} ({e}): install redis-server (apt-get install redis-server) or set REDIS_SERVER")
            });
        self.child = Some(child);
        let url = self.url();
        let answers = eventually(Duration::from_secs(10), || {
            let url = url.clone();
            async move { ping(&url).await }
        })
        .await;
        assert!(answers, "redis-server answers on port {}", self.port);
    }

    /// Stops Redis (SIGTERM, as an orchestrator would) and waits for it to exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let _ = child.wait().await;
        }
    }

    /// A connection for inspecting what the service wrote.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connects")
    }
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}
