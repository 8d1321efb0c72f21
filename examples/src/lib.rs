//! Small runnable programs that use kache's crates on their own; see `examples/README.md`.
