//! `taskvm serve`: the embedded queue. Tasks live in SQLite under the state directory, a
//! scheduler runs them on this host's VMs, and one HTTP server carries the API, the web UI
//! and the consoles' websockets.
//!
//! # Layout
//! - [`store`]: tasks and runs in SQLite.
//! - [`scheduler`]: which task runs when; cancel, watch and follow running ones.
//! - [`api`]: the JSON API and `/metrics` (written by [`metrics`]); [`openapi`]: its document.
//! - [`wire`]: every JSON body as a type (the OpenAPI schemas derive from them; `taskvm
//!   submit` reads them).
//! - [`ui`]: the pages; [`console`]: the websocket to a VM's VNC server; [`shell`]: the
//!   websocket to a login shell in a VM; [`shell_client`]: its client, for `taskvm shell`.
//! - [`access`]: loopback or token.
//! - [`client`]: a client of the API typed with [`wire`] (what `taskvm submit` uses).

#![warn(clippy::unwrap_used)]

pub mod access;
pub mod api;
pub mod client;
pub mod console;
pub mod metrics;
pub mod openapi;
pub mod scheduler;
pub mod shell;
pub mod shell_client;
pub mod store;
pub mod ui;
pub mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;
use thiserror::Error;
use tokio::sync::watch;

use self::access::Access;
use self::api::App;
use self::scheduler::Scheduler;
use self::store::{Store, StoreError};
use lifecycle::capacity::{Capacity, Resources};
use lifecycle::host::Host;

/// Largest request body: a payload is a few KiB.
pub const BODY_LIMIT: usize = 1 << 20;

/// Why the server could not run.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The queue database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listening socket.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address of the API and UI.
    pub listen: SocketAddr,
    /// Largest number of tasks run at once.
    pub concurrency: usize,
    /// What VMs may hold in all.
    pub capacity: Resources,
    /// Accept tasks but run none.
    pub paused: bool,
    /// Ask for the token even on loopback.
    pub require_token: bool,
    /// noVNC's files (None: no console in the UI).
    pub novnc_dir: Option<PathBuf>,
    /// xterm.js's package directory (None: no terminal in the UI).
    pub xterm_dir: Option<PathBuf>,
    /// Runs a task gets at most when worker shutdowns interrupt it.
    pub max_runs: u32,
}

/// The serve part of the state directory.
pub fn serve_dir(host: &Host) -> PathBuf {
    host.config.state_dir.join("serve")
}

/// Runs the server until `shutdown` completes; then stops the running tasks (resolved
/// `exception/worker-shutdown` and queued again for the next start) and returns.
/// `announce` gets the address and, off loopback, the token, once.
pub async fn serve(
    host: Arc<Host>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    announce: &dyn Fn(&str),
) -> Result<(), ServeError> {
    let dir = serve_dir(&host);
    let store = Arc::new(Store::open(&dir.join("queue.sqlite"), options.max_runs)?);
    let recovered = store.recover()?;
    if recovered.requeued + recovered.given_up > 0 {
        announce(&format!(
            "{} task(s) were running when the server stopped: {} queued again, {} out of \
             attempts (exception/worker-shutdown)",
            recovered.requeued + recovered.given_up,
            recovered.requeued,
            recovered.given_up
        ));
    }
    let scheduler = Scheduler::new(
        host,
        store,
        Capacity::new(options.capacity),
        options.concurrency,
        dir.join("tasks"),
        options.paused,
    );
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServeError::Listen {
            address: options.listen,
            source,
        })?;
    // The bound address (a port 0 is chosen now) is the one `Host` must name.
    let address = listener.local_addr().unwrap_or(options.listen);
    let access = Access::for_address(address, options.require_token);
    let app = Arc::new(App {
        scheduler: scheduler.clone(),
        novnc_dir: options.novnc_dir.clone(),
        xterm_dir: options.xterm_dir.clone(),
    });
    let router = router(app, access.clone());
    match access.token() {
        None => announce(&format!("listening on http://{address}/")),
        Some(token) => {
            announce(&format!("listening on http://{address}/"));
            announce(&format!(
                "access token (shown once): {token} — open http://{address}/?token={token} or \
                 send Authorization: Bearer {token}"
            ));
        }
    }
    if options.paused {
        announce("paused: tasks are accepted and kept queued, none is started");
    }
    let (stop_scheduler, stopped) = watch::channel(false);
    let scheduling = tokio::spawn(scheduler.clone().run(stopped));
    let kept_sweep = tokio::spawn(sweep_kept(scheduler.host().clone()));
    let (stop_http, http_stopped) = watch::channel(false);
    let http = tokio::spawn(async move {
        let mut http_stopped = http_stopped;
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = http_stopped.wait_for(|stop| *stop).await;
            })
            .await;
    });
    shutdown.await;
    announce("stopping: running tasks are resolved exception/worker-shutdown and queued again");
    let _ = stop_scheduler.send(true);
    let _ = scheduling.await;
    kept_sweep.abort();
    let _ = stop_http.send(true);
    // Followers of queued tasks' logs would keep the server open forever.
    let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
    Ok(())
}

/// Deletes kept VMs past their time or the kept limits while the server runs, checking every
/// half `kept.ttl` (between 1 s and 60 s), so that one nobody looks at still goes on time.
async fn sweep_kept(host: Arc<lifecycle::host::Host>) {
    let every = Duration::from_secs((host.config.kept.ttl / 2).clamp(1, 60));
    let store = lifecycle::kept::KeptStore::for_config(&host.config);
    loop {
        tokio::time::sleep(every).await;
        let store = store.clone();
        let Ok(deleted) = tokio::task::spawn_blocking(move || store.trim()).await else {
            continue;
        };
        for name in deleted {
            tracing::info!("kept VM {name} deleted (its kept.ttl passed, or past the kept limits)");
        }
    }
}

fn router(app: Arc<App>, access: Access) -> Router {
    let api = Router::new()
        .route("/api/tasks", post(api::submit).get(api::list))
        .route("/api/tasks/{task_id}", get(api::show))
        .route("/api/tasks/{task_id}/cancel", post(api::cancel))
        .route("/api/tasks/{task_id}/log", get(api::log))
        .route("/api/tasks/{task_id}/artifacts/{*name}", get(api::artifact))
        .route("/api/tasks/{task_id}/screenshot", get(api::screenshot))
        .route("/api/tasks/{task_id}/console", get(api::console))
        .route("/api/tasks/{task_id}/shell", get(api::shell))
        .route("/api/kept", get(api::kept::list))
        .route("/api/kept/{name}", delete(api::kept::remove))
        .route("/api/kept/{name}/shell", get(api::kept::shell))
        .route("/api/kept/{name}/exec", post(api::kept::exec))
        .route("/api/health", get(api::health))
        .route("/api/openapi.json", get(api::openapi))
        .route("/api", get(api::no_route))
        .route("/api/{*rest}", get(api::no_route).post(api::no_route))
        .route("/metrics", get(api::metrics));
    api.merge(ui::routes())
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            access,
            access::enforce,
        ))
        .with_state(app)
}
