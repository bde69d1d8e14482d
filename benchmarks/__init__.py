"""Speed, memory and Table I measurements; run each from the repository root as `python -m benchmarks.<name>`."""
