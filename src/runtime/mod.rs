//! The production shell: a tokio loop that owns the core `Dispatcher` and runs its commands.
