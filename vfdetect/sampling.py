"""Training and validation segments: class-weighted centre sampling, augmentation and tf.data wiring.

The pipeline follows DeepMedic's per-class sampling as used by the paper (see
``deepmedic_spec.md`` sections 3 and 4):

1. Each training case is resampled to the internal frame, z-scored over the body and reflect-padded
   by the network's margin (:func:`prepare_case`).
2. Per subepoch, up to ``cases_per_subepoch`` random cases are picked and the segments are split
   evenly between them, the remainder going to random cases (:func:`draw_subepoch`). Cases with
   unequal ``weight`` (manifest column) get shares of the segments proportional to their weights.
3. Within a case, class ``c`` (0 background, 1 normal vertebra, 2 fractured vertebra) receives
   ``floor(n * p_c)`` segments and the leftovers are drawn in proportion to ``p``; a class absent
   from the case gets ``p_c = 0`` and the others are renormalised (:func:`distribute_to_classes`).
4. Centres are drawn with replacement, uniformly over the class's voxels among the valid centres of
   the padded volume (those whose whole high-resolution segment fits, :func:`sample_centres`).
5. Each sample is the high-resolution (HR) segment, its decimated low-resolution (LR) context and
   the label block of the network's output size; intensity noise ``I' = (I + s) * m`` (same ``s``,
   ``m`` for both pathways) and random flips per axis. A flipped sample is the sample of the
   mirrored volume (:func:`extract_sample`), not the flipped arrays: the LR window is not symmetric
   about the segment centre. With ``randomise`` on, each sample is read from a randomised scan
   (intensity, gamma, blur, thick slices, noise, bias field; :func:`randomised_window`), the same
   one for both pathways. All samples of a subepoch are shuffled together.

Every draw comes from a :class:`numpy.random.Generator`; :func:`subepoch_rng` derives it from
``(seed, epoch, subepoch)``, so a given subepoch always yields the same segments whichever thread
draws it and whether or not the run was resumed. Arrays are indexed ``[x, y, z]`` and batches are
``(batch, x, y, z, channel)``.

TensorFlow is imported only inside :func:`segments_dataset` and :func:`make_dataset`.

Modules: this one holds the settings (:class:`SamplingConfig`); :mod:`vfdetect.training_cases`
(loading, padding, class centres), :mod:`vfdetect.augment` (domain randomisation),
:mod:`vfdetect.segments` (extraction, subepoch drawing, the seeded sampler) and
:mod:`vfdetect.dataset` (tf.data) hold the rest, re-exported here.
"""


from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vfdetect.augment import (
    PROBABILITY_FIELDS,
    Randomisation,
    draw_randomisation,
    noise_box,
    randomised_window,
)
from vfdetect.dataset import make_dataset, segments_dataset
from vfdetect.errors import VfdetectError, refuse_unknown_fields
from vfdetect.segments import (
    TrainingSampler,
    draw_subepoch,
    extract_sample,
    subepoch_positions,
    subepoch_rng,
    uniform_validation_segments,
)
from vfdetect.training_cases import (
    CLASS_NAMES,
    N_CLASSES,
    PreparedCase,
    ShapeLike,
    TrainingCase,
    distribute_to_classes,
    load_training_case,
    prepare_case,
    sample_centres,
    valid_centre_bounds,
)

# Range settings of SamplingConfig and the lowest value each may take (None: any).
_RANGE_FIELDS: dict[str, float | None] = {
    "intensity_scale": 0.0,
    "intensity_offset": None,
    "gamma_range": 0.0,
    "gamma_window": None,
    "blur_sigma": 0.0,
    "slice_thickness": 1.0,
    "noise_sd": 0.0,
    "noise_correlation": 0.0,
    "bias_wavelength": 0.0,
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    """How training segments are drawn and augmented.

    Attributes:
        hr_shape: high-resolution segment shape ``(x, y, z)``; 25^3 as in the original DeepMedic.
        class_weights: sampling proportions of (background, normal vertebra, fractured vertebra);
            normalised to sum 1. Equal thirds follow DeepMedic's per-class sampling.
        cases_per_subepoch: at most this many random cases contribute to one subepoch (DeepMedic 50).
        noise_shift_sd: standard deviation of the additive intensity shift ``s ~ N(0, sd)``.
        noise_scale_sd: standard deviation of the multiplicative factor ``m ~ N(1, sd)``.
        flip_probability: probability of flipping along x, y and z, each independently.
        randomise: master switch of the domain randomisation below (off by default, so that
            existing experiment files reproduce; :meth:`randomised` turns it on).
        intensity_probability, intensity_scale, intensity_offset: probability of a global intensity
            change ``I' = a I + b``, ``a`` log-uniform in ``intensity_scale`` and ``b`` uniform in
            ``intensity_offset`` (normalised units: a z-score scale/offset is an HU scale/offset).
        gamma_probability, gamma_range, gamma_window: probability of a gamma curve, ``gamma``
            log-uniform in ``gamma_range``, applied to ``u = (I - lo) / (hi - lo)`` for ``u`` in [0, 1]
            (``lo, hi = gamma_window``); values outside the window are unchanged (monotone, continuous).
        blur_probability, blur_sigma: probability of an isotropic Gaussian blur with ``sigma``
            (voxels) uniform in ``blur_sigma``.
        thick_slice_probability, slice_thickness: probability of simulating thick slices along one
            random axis: box averages over slabs of the drawn thickness (voxels, uniform in
            ``slice_thickness``) at a random phase, linearly interpolated back to the voxel grid.
        noise_probability, noise_sd, noise_correlation: probability of additive Gaussian noise with
            standard deviation uniform in ``noise_sd`` (normalised units) and spatial correlation
            ``sigma`` uniform in ``noise_correlation`` (voxels; 0 gives white noise).
        bias_probability, bias_gain, bias_offset, bias_wavelength: probability of a smooth bias
            field ``I' = I (1 + g(p)) + o(p)``, ``g`` and ``o`` each a sum of two plane waves of
            random direction, wavelength uniform in ``bias_wavelength`` (voxels) and amplitudes up
            to ``bias_gain`` and ``bias_offset``.

    Voxel lengths are millimetres at the default 1 mm internal spacing. The randomisation is drawn
    per segment and applied to the image before the HR segment and the LR context are read from
    it (:func:`randomised_window`), so both pathways see one physically randomised scan.
    """

    hr_shape: tuple[int, int, int] = (25, 25, 25)
    class_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    cases_per_subepoch: int = 50
    noise_shift_sd: float = 0.05
    noise_scale_sd: float = 0.01
    flip_probability: tuple[float, float, float] = (0.5, 0.5, 0.5)
    randomise: bool = False
    intensity_probability: float = 0.8
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    intensity_offset: tuple[float, float] = (-0.2, 0.2)
    gamma_probability: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    gamma_window: tuple[float, float] = (-3.0, 5.0)
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    thick_slice_probability: float = 0.3
    slice_thickness: tuple[float, float] = (1.0, 5.0)
    noise_probability: float = 0.5
    noise_sd: tuple[float, float] = (0.02, 0.3)
    noise_correlation: tuple[float, float] = (0.0, 1.5)
    bias_probability: float = 0.3
    bias_gain: float = 0.1
    bias_offset: float = 0.2
    bias_wavelength: tuple[float, float] = (80.0, 300.0)

    @classmethod
    def randomised(cls, **overrides: Any) -> SamplingConfig:
        """The domain-randomisation preset: the default ranges with ``randomise`` on."""
        return cls(**{"randomise": True, **overrides})

    def __post_init__(self) -> None:
        hr_shape = tuple(int(n) for n in self.hr_shape)
        if len(hr_shape) != 3 or min(hr_shape) < 1:
            raise VfdetectError(f"hr_shape must be three positive sizes, got {self.hr_shape}")
        object.__setattr__(self, "hr_shape", hr_shape)
        weights = tuple(float(w) for w in self.class_weights)
        if len(weights) != N_CLASSES or min(weights) < 0 or not math.isfinite(sum(weights)) or sum(weights) <= 0:
            raise VfdetectError(
                f"class_weights must be {N_CLASSES} non-negative numbers with a positive sum, got {self.class_weights}"
            )
        object.__setattr__(self, "class_weights", tuple(w / sum(weights) for w in weights))
        if int(self.cases_per_subepoch) < 1:
            raise VfdetectError(f"cases_per_subepoch must be at least 1, got {self.cases_per_subepoch}")
        object.__setattr__(self, "cases_per_subepoch", int(self.cases_per_subepoch))
        if not (self.noise_shift_sd >= 0 and self.noise_scale_sd >= 0):
            raise VfdetectError("noise_shift_sd and noise_scale_sd must be non-negative")
        flips = tuple(float(p) for p in self.flip_probability)
        if len(flips) != 3 or not all(0.0 <= p <= 1.0 for p in flips):
            raise VfdetectError(f"flip_probability must be three probabilities, got {self.flip_probability}")
        object.__setattr__(self, "flip_probability", flips)
        object.__setattr__(self, "randomise", bool(self.randomise))
        for name in PROBABILITY_FIELDS:
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise VfdetectError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
            object.__setattr__(self, name, value)
        for name, minimum in _RANGE_FIELDS.items():
            pair = tuple(float(v) for v in getattr(self, name))
            if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or pair[0] > pair[1]:
                raise VfdetectError(f"{name} must be a range (low, high) with low <= high, got {getattr(self, name)}")
            if minimum is not None and pair[0] < minimum:
                raise VfdetectError(f"{name} must not go below {minimum}, got {pair}")
            object.__setattr__(self, name, pair)
        if self.intensity_scale[0] <= 0 or self.gamma_range[0] <= 0:
            raise VfdetectError("intensity_scale and gamma_range must be positive")
        if self.gamma_window[0] >= self.gamma_window[1]:
            raise VfdetectError(f"gamma_window must have low < high, got {self.gamma_window}")
        if self.bias_wavelength[0] <= 0:
            raise VfdetectError(f"bias_wavelength must be positive, got {self.bias_wavelength}")
        for name in ("bias_gain", "bias_offset"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise VfdetectError(f"{name} must be non-negative, got {getattr(self, name)}")
            object.__setattr__(self, name, value)
        if self.bias_gain >= 0.5:
            raise VfdetectError(f"bias_gain must be below 0.5 (two waves keep 1 + g positive), got {self.bias_gain}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (lists for tuples)."""
        values = {
            "hr_shape": list(self.hr_shape),
            "class_weights": list(self.class_weights),
            "cases_per_subepoch": self.cases_per_subepoch,
            "noise_shift_sd": self.noise_shift_sd,
            "noise_scale_sd": self.noise_scale_sd,
            "flip_probability": list(self.flip_probability),
            "randomise": self.randomise,
        }
        for name in (*PROBABILITY_FIELDS, "bias_gain", "bias_offset"):
            values[name] = getattr(self, name)
        for name in _RANGE_FIELDS:
            values[name] = list(getattr(self, name))
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        refuse_unknown_fields(cls, values, "sampling setting(s)")
        return cls(
            hr_shape=tuple(values.get("hr_shape", cls.hr_shape)),  # type: ignore[arg-type]
            class_weights=tuple(values.get("class_weights", cls.class_weights)),  # type: ignore[arg-type]
            cases_per_subepoch=int(values.get("cases_per_subepoch", cls.cases_per_subepoch)),
            noise_shift_sd=float(values.get("noise_shift_sd", cls.noise_shift_sd)),
            noise_scale_sd=float(values.get("noise_scale_sd", cls.noise_scale_sd)),
            flip_probability=tuple(values.get("flip_probability", cls.flip_probability)),  # type: ignore[arg-type]
            randomise=bool(values.get("randomise", cls.randomise)),
            **_randomisation_settings(values),
        )


def _randomisation_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name in (*PROBABILITY_FIELDS, "bias_gain", "bias_offset"):
        if name in values:
            settings[name] = float(values[name])
    for name in _RANGE_FIELDS:
        if name in values:
            settings[name] = tuple(float(v) for v in values[name])
    return settings


__all__ = [
    "CLASS_NAMES",
    "N_CLASSES",
    "PROBABILITY_FIELDS",
    "PreparedCase",
    "Randomisation",
    "SamplingConfig",
    "ShapeLike",
    "TrainingCase",
    "TrainingSampler",
    "distribute_to_classes",
    "draw_randomisation",
    "draw_subepoch",
    "extract_sample",
    "load_training_case",
    "make_dataset",
    "noise_box",
    "prepare_case",
    "randomised_window",
    "sample_centres",
    "segments_dataset",
    "subepoch_positions",
    "subepoch_rng",
    "uniform_validation_segments",
    "valid_centre_bounds",
]
