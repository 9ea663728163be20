"""Local inference servers used by the tests and benchmarks (a real vLLM on CPU, and a fake)."""
