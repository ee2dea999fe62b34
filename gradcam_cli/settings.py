"""The settings of the methods that take any, gathered in one value from the CLI to ``explain``.

Each family's settings live beside its method (``occlusion.OcclusionSettings``, …) and check
their own fields; ``MethodSettings`` carries them together so that every command, record and
resume check passes one thing around, and keeps in a record only the settings of the methods
that were asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from .errors import ArgumentTypeError
from .occlusion import OcclusionSettings
from .paths import PathSettings, SmoothSettings
from .precision import Precision
from .refine import CamSettings
from .rise import RiseSettings


@dataclass(frozen=True)
class MethodSettings:
    """Per family of methods, its settings (each field's default is the family's default)."""

    occlusion: OcclusionSettings = field(default_factory=OcclusionSettings)
    rise: RiseSettings = field(default_factory=RiseSettings)
    ig: PathSettings = field(default_factory=PathSettings)
    smooth: SmoothSettings = field(default_factory=SmoothSettings)
    cam: CamSettings = field(default_factory=CamSettings)
    precision: Precision = field(default_factory=Precision)  # of the explained forward passes

    def __post_init__(self) -> None:
        """Refuse a field of the wrong kind, naming it."""
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default_factory())
            if not isinstance(value, kind):
                raise ArgumentTypeError(f.name, value, f"a {kind.__name__}(…)")

    def to_dict(self, methods: Sequence[str]) -> dict:
        """The settings of the methods in ``methods``, as records and the resume check keep them."""
        return {f.name: getattr(self, f.name).to_dict() for f in fields(self)
                if getattr(self, f.name).used_by(methods)}


def check_settings(settings: MethodSettings | None) -> MethodSettings:
    """The methods' settings, the defaults for None; anything else is refused."""
    if settings is None:
        return MethodSettings()
    if not isinstance(settings, MethodSettings):
        raise ArgumentTypeError("settings", settings, "a MethodSettings(occlusion=…, …)")
    return settings
