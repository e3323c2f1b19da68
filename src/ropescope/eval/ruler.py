"""RULER's synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?"), built on the task registry. Filled in below."""

from __future__ import annotations

TASKS: tuple = ()
