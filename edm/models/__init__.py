"""Model files: edm checkpoints, model folders without pickles, NVlabs snapshots read without
their code. Each becomes one checkpoint dict, and `loading.load_model` turns that into a denoiser."""
