"""The built-in rules, one per file."""

from .adafactor import adafactor
from .adam import adam
from .adam_mini import adam_mini
from .adamw import adamw
from .lamb import lamb
from .lion import lion
from .microadam import microadam
from .sgd import sgd

__all__ = ["adafactor", "adam", "adam_mini", "adamw", "lamb", "lion", "microadam", "sgd"]
