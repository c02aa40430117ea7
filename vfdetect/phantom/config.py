"""Settings of the phantom generator and the anatomy tables it draws from.

:class:`PhantomConfig` (frozen, validated) holds everything that varies between phantom datasets;
the module constants hold the levels (VerSe labels), the Genant height-loss bands, the fracture
morphologies, nominal adult dimensions per level and the relative fracture chance per level.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from vfdetect.errors import VfdetectError

# Cranio-caudal levels of the phantoms, VerSe labels: T1..T12, L1..L5, S1 (26), S2 (29).
LEVELS: tuple[int, ...] = (*range(8, 20), *range(20, 25), 26, 29)
# Genant height-loss bands (fraction of the expected height) per grade.
GENANT_BANDS: dict[int, tuple[float, float]] = {0: (0.0, 0.20), 1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 1.0)}
MORPHOLOGIES: tuple[str, ...] = ("wedge", "biconcave", "crush")

# Nominal adult dimensions per level in mm (from morphometry literature, tuned to the real CT
# measured in experiments/calibration): body height, mid-sagittal depth, width, height of the
# disc below, canal radius AP / LR, sagittal tangent angle of the level in degrees (positive:
# superior end tilted anteriorly), spinous process length and downward slope in degrees.
#            H     D     W   disc  cAP  cLR  angle  spL  spSlope
_ANATOMY = {
    8: (14.5, 15.5, 25.0, 4.0, 7.0, 8.5, 18.0, 30.0, 35.0),
    9: (15.5, 16.5, 25.5, 4.0, 7.0, 8.0, 15.0, 32.0, 45.0),
    10: (16.0, 18.0, 26.0, 4.2, 7.0, 8.0, 12.0, 33.0, 55.0),
    11: (16.5, 19.5, 26.5, 4.4, 7.0, 8.0, 9.0, 34.0, 60.0),
    12: (17.0, 21.0, 27.5, 4.6, 7.0, 8.0, 6.0, 34.0, 60.0),
    13: (17.5, 22.5, 28.5, 4.8, 7.0, 8.0, 3.0, 34.0, 60.0),
    14: (18.0, 24.0, 29.5, 5.0, 7.0, 8.0, 0.0, 34.0, 58.0),
    15: (18.8, 25.5, 31.0, 5.2, 7.0, 8.0, -3.0, 33.0, 55.0),
    16: (19.5, 26.5, 33.0, 5.6, 7.2, 8.2, -6.0, 32.0, 45.0),
    17: (20.5, 27.5, 35.5, 6.2, 7.5, 8.5, -9.0, 31.0, 35.0),
    18: (21.5, 28.5, 38.0, 7.0, 7.8, 9.0, -11.0, 30.0, 25.0),
    19: (23.2, 29.5, 40.5, 8.0, 8.0, 10.0, -12.0, 30.0, 15.0),
    20: (25.0, 31.0, 42.5, 9.0, 8.5, 11.0, -10.0, 30.0, 8.0),
    21: (26.0, 32.5, 43.0, 10.0, 8.5, 11.5, -6.0, 31.0, 5.0),
    22: (26.5, 33.5, 44.5, 10.5, 8.5, 12.0, 0.0, 31.0, 3.0),
    23: (26.5, 34.0, 46.0, 10.5, 8.5, 12.5, 8.0, 29.0, 3.0),
    24: (26.0, 34.0, 47.0, 10.0, 8.5, 13.0, 18.0, 25.0, 3.0),
    26: (26.0, 33.0, 48.0, 1.5, 7.0, 12.0, 38.0, 14.0, 10.0),
    29: (22.0, 26.0, 36.0, 1.5, 6.0, 10.0, 55.0, 10.0, 10.0),
}

_LUMBAR = frozenset(range(20, 25))
_SACRAL = frozenset((26, 29))
_THORACIC = frozenset(range(8, 20))

# Relative chance of a fracture per level: thoracolumbar peak (T11-L2) and mid-thoracic peak (T7-T8).
_FRACTURE_WEIGHT = {
    8: 0.2, 9: 0.3, 10: 0.5, 11: 0.8, 12: 1.2, 13: 1.5, 14: 1.6, 15: 1.4, 16: 1.2, 17: 1.4,
    18: 2.2, 19: 3.0, 20: 3.0, 21: 2.0, 22: 1.4, 23: 1.0, 24: 0.6, 26: 0.0, 29: 0.0,
}

_ORIENTATIONS = ("RAS", "LPS", "PIR", "LAS", "LPI", "RPI", "ASL")


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that varies between phantom datasets; defaults mimic the paper's data.

    Fractions are of vertebrae (``fracture_prevalence``) and of patients (``negative_fraction``);
    ``adjacent_probability`` is the chance that a further fracture of a patient sits next to an
    earlier one. Spacing ranges are in mm; ``slice_spacing_choices`` are drawn with
    ``slice_spacing_weights``. ``anatomy_scale`` scales every anatomical size (1 = adult).
    ``max_length_mm`` caps the scanned length (fewer vertebrae when the cap is hit).
    The square field of view (``fov_mm``) is centred ``fov_posterior_shift`` x its size behind the
    spine's body centroids; ``fat_mm`` is the range of subcutaneous fat thickness.

    Patient-level properties (bone density, posture, body size, degeneration, tissue HU) are drawn
    from one population whether or not the patient has a fracture, so that a network cannot tell
    fractured patients apart by anything but the fractures. ``density_fracture_correlation=True``
    restores the older, confounded draw for experiments: trabecular bone about 105 +/- 25 HU and
    kyphosis factor 0.8-1.6 in patients with a fracture, 165 +/- 35 HU and 0.6-1.3 in the others.
    """

    min_vertebrae: int = 5
    max_vertebrae: int = 17
    abdominal_fraction: float = 0.75
    fracture_prevalence: float = 0.19
    negative_fraction: float = 0.12
    adjacent_probability: float = 0.5
    grade_probabilities: tuple[float, float, float] = (0.46, 0.35, 0.19)
    morphology_probabilities: tuple[float, float, float] = (0.5, 0.3, 0.2)
    inplane_spacing_mm: tuple[float, float] = (0.6, 1.0)
    slice_spacing_choices: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
    slice_spacing_weights: tuple[float, ...] = (0.3, 0.15, 0.25, 0.15, 0.05, 0.1)
    fov_mm: tuple[float, float] = (170.0, 240.0)
    fov_posterior_shift: float = 0.1
    fat_mm: tuple[float, float] = (8.0, 35.0)
    max_length_mm: float | None = None
    orientations: tuple[str, ...] = _ORIENTATIONS
    anatomy_scale: float = 1.0
    noise_sd_hu: tuple[float, float] = (20.0, 40.0)
    blur_sigma_mm: tuple[float, float] = (0.35, 0.7)
    ribs: bool = True
    pelvis: bool = True
    lungs: bool = True
    density_fracture_correlation: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_vertebrae <= self.max_vertebrae <= len(LEVELS) - 1:
            raise VfdetectError(
                f"phantom vertebra count range {self.min_vertebrae}..{self.max_vertebrae} must lie in 1..{len(LEVELS) - 1}"
            )
        for name in ("fracture_prevalence", "negative_fraction", "adjacent_probability", "abdominal_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise VfdetectError(f"phantom {name} must lie in [0, 1], got {value}")
        if self.negative_fraction >= 1.0 and self.fracture_prevalence > 0:
            raise VfdetectError("phantom negative_fraction 1 leaves no patient to hold the fractures")
        for name in ("grade_probabilities", "morphology_probabilities", "slice_spacing_weights"):
            values = np.asarray(getattr(self, name), dtype=float)
            if values.min() < 0 or values.sum() <= 0:
                raise VfdetectError(f"phantom {name} must be non-negative with a positive sum")
        if len(self.slice_spacing_choices) != len(self.slice_spacing_weights):
            raise VfdetectError("phantom slice_spacing_choices and slice_spacing_weights differ in length")
        if min(self.inplane_spacing_mm) <= 0 or min(self.slice_spacing_choices) <= 0:
            raise VfdetectError("phantom spacings must be positive")
        for code in self.orientations:
            try:
                nib.orientations.axcodes2ornt(tuple(code))
                valid = len(code) == 3
            except Exception:
                valid = False
            if not valid:
                raise VfdetectError(f"phantom orientation {code!r} is not a 3-letter axis code like RAS")
        if self.anatomy_scale <= 0:
            raise VfdetectError("phantom anatomy_scale must be positive")

    @classmethod
    def small(cls) -> PhantomConfig:
        """Tiny fast phantoms for tests and the demo: 1 mm voxels, about 100 x 100 x 140, 4-5 vertebrae."""
        return cls(
            min_vertebrae=4,
            max_vertebrae=5,
            inplane_spacing_mm=(1.0, 1.0),
            slice_spacing_choices=(1.0,),
            slice_spacing_weights=(1.0,),
            fov_mm=(100.0, 100.0),
            fov_posterior_shift=0.3,
            fat_mm=(15.0, 25.0),
            max_length_mm=140.0,
            anatomy_scale=0.75,
        )
