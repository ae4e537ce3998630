"""Pre-training with GLM-130B's objective: autoregressive blank infilling."""

from glmc.train.objective import Sample, collate, gmask_sample, make_sample, mask_sample
from glmc.train.trainer import TrainOptions, TrainResult, deepnorm_init_, train

__all__ = ["Sample", "TrainOptions", "TrainResult", "collate", "deepnorm_init_", "gmask_sample", "make_sample",
           "mask_sample", "train"]
