"""Hugging Face models: loading folders and the default model, finding blocks and linears, capturing block inputs."""
