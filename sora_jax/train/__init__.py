"""Training, evaluation and checkpointing of Sora models."""
