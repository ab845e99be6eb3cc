"""Scoring images and models: FID, precision/recall, FD_cls, bits/dim, and quality against NFE."""
