//! The retry policy, and the bounded retry of reads (each attempt a fresh statement). Writes are
//! retried by the write layer (`write.rs`), under the same policy.

use std::future::Future;
use std::time::Duration;

use super::error::DbError;

/// How often and how patiently a transient failure is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total (the first one included); at least 1.
    pub max_attempts: u32,
    /// The pause before the second attempt; doubled before each further one.
    pub base_delay: Duration,
    /// The longest pause.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The pause after failed attempt number `attempt` (1-based), without jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// Runs `op` (a read) until it succeeds, fails with a non-transient error, or `policy.max_attempts`
/// attempts have failed; then the last error is returned. Every retry is logged with
/// `tracing::warn!`, giving up with `tracing::error!`.
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, what: &str, mut op: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let max = policy.max_attempts.max(1);
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let Some(kind) = e.transient() else {
                    return Err(e);
                };
                if attempt >= max {
                    tracing::error!(op = what, attempts = attempt, ?kind, error = %e, "database operation failed; giving up");
                    return Err(e);
                }
                let delay = jitter(policy.delay(attempt));
                tracing::warn!(op = what, attempt, max_attempts = max, ?kind, ?delay, error = %e, "database operation failed; retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

/// `d` plus up to a quarter of it, so that writers who collided do not collide again in step.
pub(crate) fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let quarter = d / 4;
    if quarter.is_zero() {
        return d;
    }
    let extra = u64::from(nanos) % (quarter.as_nanos().min(u128::from(u64::MAX)) as u64).max(1);
    d + Duration::from_nanos(extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn busy() -> DbError {
        DbError::Sql(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )))
    }

    fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[test]
    fn delays_double_and_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1), Duration::from_millis(10));
        assert_eq!(p.delay(2), Duration::from_millis(20));
        assert_eq!(p.delay(4), Duration::from_millis(80));
        assert_eq!(p.delay(20), Duration::from_secs(2));
        assert_eq!(p.delay(200), Duration::from_secs(2));
        let j = jitter(Duration::from_millis(100));
        assert!(j >= Duration::from_millis(100) && j <= Duration::from_millis(125));
    }

    #[tokio::test]
    async fn succeeds_after_transient_failures() {
        let calls = AtomicU32::new(0);
        let r = retry(&fast(5), "test", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(busy())
            } else {
                Ok(42)
            }
        })
        .await;
        assert_eq!(r.ok(), Some(42));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn gives_up_after_the_bound() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry(&fast(5), "test", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(busy())
        })
        .await;
        assert!(r.is_err_and(|e| e.is_retryable()));
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn does_not_retry_permanent_errors() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry(&fast(5), "test", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(DbError::Invalid("no".into()))
        })
        .await;
        assert!(matches!(r, Err(DbError::Invalid(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
