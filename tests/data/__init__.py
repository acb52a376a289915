"""Fixed test data written for ArrowQuant's tests and quality benchmarks."""
