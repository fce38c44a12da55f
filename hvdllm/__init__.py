"""hvdllm: train Hugging Face causal LMs across MPI ranks."""

__version__ = "0.1.0"
