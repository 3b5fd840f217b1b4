//! Logging and process signals.
//!
//! Functions log through `tracing`. Each command is one `command` span with the fields
//! `aggregate`, `id`, `command`, `command_id`, `outcome`, `retries` and `duration_ms`;
//! `RUST_LOG` filters (default `info`).

use tracing_subscriber::EnvFilter;

/// Installs a formatting subscriber filtered by `RUST_LOG` (default `info`). Does nothing if a
/// subscriber is already installed, so tests and embedding programs keep theirs.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let interrupt = async {
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
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
