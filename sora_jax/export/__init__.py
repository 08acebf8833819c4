"""Exported models for downstream teams, and prediction on raw video files."""
