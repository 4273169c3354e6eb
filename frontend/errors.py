"""Frontend errors: one UnsupportedOpError that lists every missing ATen op at once."""
from __future__ import annotations


class ConversionError(Exception):
    """One node could not be converted; the importer collects these."""


class UnsupportedOpError(Exception):
    """The model uses ATen ops (or op variants) that bitsmith cannot import yet."""

    def __init__(self, missing: dict[str, list[str]]) -> None:
        self.missing = missing
        lines = [f"{len(missing)} unsupported ATen op(s) in the model:"]
        for target, where in sorted(missing.items()):
            places = ", ".join(sorted(set(where))[:5])
            more = f" (+{len(set(where)) - 5} more)" if len(set(where)) > 5 else ""
            lines.append(f"  {target}  at {places}{more}")
        lines.append("add a converter in bitsmith/frontend/aten*.py or decompose the op "
                     "(frontend.importer.decomposition_table)")
        super().__init__("\n".join(lines))
