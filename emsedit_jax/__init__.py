"""emsedit-jax: EMSEdit and meta-learning model editors as pure JAX functions."""

__version__ = "0.1.0"
