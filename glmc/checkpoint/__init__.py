"""SAT checkpoints: read, validate, reshard, quantize, write."""

from glmc.checkpoint.convert import convert_checkpoint, iter_rank_weights
from glmc.checkpoint.load import load_model, model_state, save_checkpoint
from glmc.checkpoint.sat import SatCheckpoint

__all__ = ["SatCheckpoint", "convert_checkpoint", "iter_rank_weights", "load_model", "model_state",
           "save_checkpoint"]
