"""Recovery: the trainable SalientLinear, objectives, the training loop, block-wise reconstruction and baselines."""
