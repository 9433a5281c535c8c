"""Quantization algorithms: grid, calibration statistics, sensitivity, groups, GPTQ, RTN, the per-block engine."""
