//! The Arvados controller client: the container queries, lock, unlock and cancel the dispatcher uses.
