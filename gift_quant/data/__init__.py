"""Text in, token windows out: data specs, named datasets with disjoint splits, calibration and training windows."""
