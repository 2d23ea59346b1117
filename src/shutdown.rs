//! Shutdown.
//!
//! One primitive: a [`CancellationToken`]. `walcast run` cancels it on the first SIGTERM or
//! SIGINT; the pipeline then stops reading, flushes the open batch, lets every sink
//! confirm, reports the final flushed position to PostgreSQL and closes the stream. A
//! second signal exits at once: nothing was acknowledged that a sink did not apply, so even
//! that loses nothing; the next start replays from the slot.
//!
//! Library entry points take their stop trigger as a future (`run(config, shutdown)`), so
//! tests can stop them without signals.

pub use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT, and exits the process with status 130 on
/// the second.
pub fn on_signals(token: CancellationToken) {
    on_signals_then(token, || {});
}

/// [`on_signals`], running `last_words` before the exit on the second signal (the demo
/// removes its servers there).
pub fn on_signals_then(token: CancellationToken, last_words: impl FnOnce() + Send + 'static) {
    let mut last_words = Some(last_words);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    return;
                }
            };
        let mut received = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            received += 1;
            if received == 1 {
                tracing::info!("shutdown requested: finishing the batch in flight");
                token.cancel();
            } else {
                tracing::warn!("second signal: exiting now; the next start resumes from the slot");
                if let Some(last_words) = last_words.take() {
                    last_words();
                }
                std::process::exit(130);
            }
        }
    });
}
