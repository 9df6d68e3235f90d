//! Loading the Arvados cluster configuration (placeholder being written).
