"""Image generation from a denoiser: per-image seeds, batches, outputs and their provenance."""
