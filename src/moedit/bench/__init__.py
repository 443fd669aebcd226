"""Speed benchmarks (docs/PERFORMANCE.md): timing helpers, the MoE layer against the dense FFN
and the peers' loops, and whole-model training steps. Benchmarks measure; tests never assert on time."""
