"""The native on-disk format: bit packing, the packed QuantLinear layer, checkpoints and run folders."""
