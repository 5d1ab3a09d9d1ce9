"""upcycle_ds: dense HuggingFace LLMs -> DeepSpeed Mixture-of-Experts (sparse upcycling, UpIT, training, conversion)."""

__version__ = "0.1.0"
