"""Entry points: the demo job, benchmarks (and later training and evaluation)."""
