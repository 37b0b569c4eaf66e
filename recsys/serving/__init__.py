"""Serving: recommendations from a checkpoint, and the exported scoring model."""
