"""`ropescope methods`: the RoPE methods of the registry and their parameters, as text."""

from __future__ import annotations

from ropescope.rope import METHODS, REQUIRED


def list_methods() -> str:
    """One line per method (name, summary, where it comes from), then one per parameter with its default."""
    lines = []
    for method in METHODS.values():
        origin = f"transformers rope_type {method.transformers_type!r}" if method.transformers_type else "ropescope"
        lines.append(f"{method.name:<13} {method.summary}  [{origin}]")
        lines += [f"{'':<15}{name} = {'(required)' if default is REQUIRED else repr(default)}"
                  for name, default in method.params.items()]
    return "\n".join(lines)
