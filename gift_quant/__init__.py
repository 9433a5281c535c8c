"""gift-quant: GIFT-SW quantization recovery for Hugging Face causal LMs."""
