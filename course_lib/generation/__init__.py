"""Generating tokens: sampling, the no-cache and KV-cache loops, speculative decoding."""
