"""Training diagnostics: routing time series, failure detectors, bf16 update underflow."""
