"""Measurement helpers shared by the benchmark scripts under experiments/."""
