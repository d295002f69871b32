"""Model code: our flat Llama forward with an explicit KV cache, and the training profiles."""
