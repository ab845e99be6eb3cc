"""Training: the config schema, what it builds, one optimizer step, the run's state and checkpoints,
EMAs, the run log and the loop."""
