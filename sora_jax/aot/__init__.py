"""Ahead-of-time checks: compile a run for a TPU slice that is not attached (sora-compile)."""
