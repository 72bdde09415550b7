"""lmfusion-jax: LMFusion (a frozen Llama-3 + trainable image weights) in JAX/Flax NNX."""

__version__ = "0.1.0"
