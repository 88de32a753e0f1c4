//! Integration tests of `holdfast-store` through its public API on the real filesystem.

mod concurrency;
mod recovery;
