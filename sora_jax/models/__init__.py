"""Pure-functional Flax modules of the Sora audio-visual model."""

from sora_jax.models.audio import AudioEncoder, GRURecurrence, LSTMRecurrence
from sora_jax.models.fusion import FUSIONS, FusionHead
from sora_jax.models.sora import (
    DTYPES,
    PARTS,
    ContrastiveHeads,
    SoraModel,
    build_model,
    check_config,
    dummy_inputs,
    param_part,
)
from sora_jax.models.visual import VisualTower

__all__ = [
    "DTYPES",
    "FUSIONS",
    "PARTS",
    "AudioEncoder",
    "ContrastiveHeads",
    "FusionHead",
    "GRURecurrence",
    "LSTMRecurrence",
    "SoraModel",
    "VisualTower",
    "build_model",
    "check_config",
    "dummy_inputs",
    "param_part",
]
