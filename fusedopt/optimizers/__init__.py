"""The built-in rules, one per file."""

from .adam import adam
from .adamw import adamw
from .lamb import lamb
from .lion import lion
from .sgd import sgd

__all__ = ["adam", "adamw", "lamb", "lion", "sgd"]
