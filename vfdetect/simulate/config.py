"""Settings of the fracture simulation: :class:`SimulationConfig`, Genant bands, morphologies, levels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vfdetect.errors import VfdetectError
from vfdetect.vertebrae import SPINE_ORDER, spine_rank, vertebra_label, vertebra_name

MORPHOLOGIES: tuple[str, ...] = ("wedge", "biconcave", "crush")
GENANT_BANDS: dict[int, tuple[float, float]] = {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 0.60)}
"""Height-loss band of each Genant grade (grade 3 is capped at 60 %)."""


def parse_levels(text: str) -> tuple[int, ...]:
    """VerSe labels of a level range or list: ``"T4-L5"`` -> T4..T12, T13, L1..L5; ``"T12,L1"``.

    Ranges follow :data:`vfdetect.vertebrae.SPINE_ORDER`; raises :class:`VfdetectError` for an
    unknown name or a range that runs caudal to cranial.
    """
    labels: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            first, last = (vertebra_label(name) for name in part.split("-", 1))
            start, stop = spine_rank(first), spine_rank(last)
            if stop < start:
                raise VfdetectError(f"level range {part!r} runs caudal to cranial")
            labels.extend(SPINE_ORDER[start : stop + 1])
        else:
            labels.append(vertebra_label(part))
    if not labels:
        raise VfdetectError(f"no vertebra levels in {text!r}")
    return tuple(sorted(set(labels), key=spine_rank))


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of the fracture simulation; the defaults follow the paper's data (as the phantoms do).

    ``fracture_prevalence`` is the share of eligible vertebrae fractured over the whole dataset and
    ``negative_fraction`` the share of scans without any fracture; a scan that is not negative has at
    least one. Grades 1/2/3 and morphologies wedge/biconcave/crush are drawn with the given
    probabilities. ``levels`` are the VerSe labels that may fracture. ``vary_acquisition`` also
    rotates (up to ``max_rotation_deg``), crops along the spine, adds noise (SD up to
    ``max_noise_sd_hu``), reorients and re-types each copy; ``compaction`` adds a denser trabecular
    band (+50..150 HU) below each collapsed endplate. ``max_tries`` is the number of morphology draws
    for a vertebra whose grade cannot be reached before it is left unfractured.
    """

    copies: int = 1
    fracture_prevalence: float = 0.19
    negative_fraction: float = 0.12
    grade_probabilities: tuple[float, float, float] = (0.46, 0.35, 0.19)
    morphology_probabilities: tuple[float, float, float] = (0.5, 0.3, 0.2)
    levels: tuple[int, ...] = field(default_factory=lambda: parse_levels("T4-L5"))
    vary_acquisition: bool = False
    compaction: bool = False
    max_rotation_deg: float = 10.0
    max_noise_sd_hu: float = 30.0
    max_tries: int = 4

    def __post_init__(self) -> None:
        if self.copies < 1:
            raise VfdetectError(f"copies must be at least 1, got {self.copies}")
        for name in ("fracture_prevalence", "negative_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise VfdetectError(f"{name} must lie in [0, 1], got {value}")
        if self.negative_fraction >= 1.0 and self.fracture_prevalence > 0:
            raise VfdetectError("negative_fraction 1 leaves no scan to hold the fractures")
        for name in ("grade_probabilities", "morphology_probabilities"):
            values = np.asarray(getattr(self, name), dtype=float)
            if values.shape != (3,) or values.min() < 0 or values.sum() <= 0:
                raise VfdetectError(f"{name} must be 3 non-negative numbers with a positive sum")
        for label in self.levels:
            vertebra_name(label)
        if self.max_tries < 1:
            raise VfdetectError("max_tries must be at least 1")
