"""emsedit-jax: EMSEdit and meta-learning model editors as pure JAX functions."""

from . import lapack_threads

__version__ = "0.1.0"

lapack_threads.limit()
