//! How long to wait before trying again: one backoff for every retry walcast makes (sink
//! writes, sinks unreachable at start, webhook deliveries, replication reconnects).

use std::time::Duration;

use rand::Rng;

/// Exponential backoff from 100 ms to 10 s with full jitter on the upper half.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling_ms = 100u64.saturating_mul(1 << attempt.min(7)).min(10_000);
    let ms = rand::rng().random_range(ceiling_ms / 2..=ceiling_ms);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) <= Duration::from_millis(100));
        assert!(backoff(0) >= Duration::from_millis(50));
        assert!(backoff(30) <= Duration::from_secs(10));
        assert!(backoff(30) >= Duration::from_secs(5));
    }
}
