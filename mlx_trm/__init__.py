"""mlx-trm: Tiny Recursive Models for language modelling on Apple MLX."""

__version__ = "0.1.0"
