//! The management API and `/metrics` (axum).
