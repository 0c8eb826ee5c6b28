//! Store metrics.
