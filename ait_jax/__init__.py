"""ait_jax: the Associative Transformer (AiT) in JAX/Flax.

Model math lives in `workspace` and `hopfield`, the Linen modules in `models`.
"""
