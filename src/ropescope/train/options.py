"""The fields of the training configs (`TrainConfig`, `PretrainConfig`) and the checks their `validate` share.

Every check raises a RopescopeError of one line that names the field, its value and what is accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

from ropescope.errors import RopescopeError


def option(default=dataclasses.MISSING, help: str = ""):
    """A config field with the help text that `--help` prints for its flag (no default: a required field)."""
    return field(default=default, metadata={"help": help})


def check_positive_integers(config, names) -> None:
    """Each field of `names` is an integer > 0."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise RopescopeError(f"{name}={value!r} is not a positive integer")


def check_not_negative(config, names) -> None:
    """Each field of `names` is >= 0."""
    for name in names:
        if getattr(config, name) < 0:
            raise RopescopeError(f"{name}={getattr(config, name)} must be >= 0")


def check_learning_rate(config) -> None:
    """The peak learning rate is > 0."""
    if not config.learning_rate > 0:
        raise RopescopeError(f"learning_rate={config.learning_rate} must be > 0")
