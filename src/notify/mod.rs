//! Notifications (`[notify]`): webhooks told when a build starts or finishes and when an
//! evaluation completes. The database writes that make those changes insert the events into
//! the outbox in the same transaction (`db/outbox.rs`); [`deliver`] POSTs them from there, at
//! least once, each with its fixed idempotency key, retrying with a capped exponential backoff.
//! See `docs/ops.md` "Notifications".
//!
//! - [`config`]: the `[[notify.webhooks]]` entries, checked at start;
//! - [`payload`]: the bodies (`qr` JSON, or GitHub's commit status), from an outbox row;
//! - [`sign`]: `X-Qr-Signature-256` (HMAC-SHA256, GitHub's scheme);
//! - [`http`]: one POST (HTTP/1.1, rustls for `https://`);
//! - [`deliver`]: the delivery task, one per webhook.

pub mod config;
pub mod deliver;
pub mod http;
pub mod payload;
pub mod sign;

pub use config::{Format, NotifyConfigError, NotifySettings, Webhook};
