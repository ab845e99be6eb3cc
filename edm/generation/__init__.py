"""Image generation from a denoiser: per-image seeds, batches and outputs (their records: edm.provenance)."""
