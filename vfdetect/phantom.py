"""Synthetic spine CT phantoms with Genant-graded vertebral compression fractures.

A phantom is a torso segment holding 5-17 vertebrae of the paper's range T1-S2 (VerSe labels 8-24,
26 = S1 and the extension 29 = S2). The anatomy is described analytically (:class:`SpineModel`):
a curved spine centreline (kyphosis, lordosis, mild scoliosis) carrying per-level vertebrae whose
size grows caudally, each made of a vertebral body (cortical shell of uneven thickness, trabecular
core with a spongy network texture, sclerotic endplates, anterior osteophytes in some patients),
pedicles, laminae, articular, transverse and spinous processes around the spinal canal, with
intervertebral discs between the bodies (some narrowed, with a vacuum cleft or calcification).
Around it: paraspinal muscles with fatty streaks and psoas, subcutaneous and visceral fat, organs,
aorta and inferior vena cava (with or without contrast), bowel gas, lungs and ribs at thoracic
levels, iliac wings at the pelvis, air outside the body.

Patient-level properties (bone density, posture, size, degeneration, tissue HU) never depend on the
patient's fractures unless ``PhantomConfig.density_fracture_correlation`` asks for it.

Fractures deform the body's endplates in its own frame (wedge: anterior collapse; biconcave:
central collapse of both endplates; crush: collapse of the whole endplate), with the adjacent
disc filling the collapsed space, a denser band of compressed trabeculae, and the spine above a
wedge tilting forward. Genant grades follow the height loss: grade 1 20-25 %, 2 25-40 %, 3 > 40 %.

The model is rendered directly onto the acquisition grid (axis-aligned, in-plane spacing
0.6-1.0 mm, slices 1-3 mm integrated from thinner sub-slices, mild blur, correlated noise; soft
tissue, ribs and pelvis on a twice coarser grid, upsampled) and then stored in one of several
orientation codes. :func:`measure_vertebral_bodies` measures the body heights,
depth, width, disc heights and tissue HU from any label mask and CT (real or phantom), which is
how the phantoms were calibrated against real CT (``experiments/calibration``) and how the tests
check every fracture's height loss against its grade.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from vfdetect.errors import VfdetectError
from vfdetect.fileio import atomic_path, write_text_atomic
from vfdetect.vertebrae import Vertebra, write_centroids

__all__ = [
    "LEVELS",
    "GENANT_BANDS",
    "MORPHOLOGIES",
    "PhantomConfig",
    "PhantomCase",
    "SpineModel",
    "VertebraShape",
    "BodyMeasurement",
    "generate_phantom",
    "write_phantom_dataset",
    "render_labels",
    "render_vertebra_labels",
    "measure_vertebral_bodies",
    "measure_soft_tissue",
]

# Cranio-caudal levels of the phantoms, VerSe labels: T1..T12, L1..L5, S1 (26), S2 (29).
LEVELS: tuple[int, ...] = (*range(8, 20), *range(20, 25), 26, 29)
_LEVEL_NAMES = {**{8 + i: f"T{i + 1}" for i in range(12)}, **{20 + i: f"L{i + 1}" for i in range(5)}, 26: "S1", 29: "S2"}
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


# ----------------------------------------------------------------------------------------------
# Configuration and results
# ----------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class VertebraShape:
    """One vertebra of a :class:`SpineModel`: its frame, size, fracture and bone density.

    ``frame`` rows are the unit vectors (superior axis, anterior axis, lateral axis) in world RAS;
    ``centre`` is the origin of that frame (mid-height of the body, world mm). Sizes in mm.
    ``top_loss`` and ``bottom_loss`` hold the fracture amplitude of each endplate as a fraction of
    ``height``; ``profile`` is the fracture morphology or "normal". ``osteophyte_mm`` is the reach of
    the bony spurs at the anterior endplate rims (0: none); ``disc_state`` describes the disc below
    ("normal", "narrowed", "vacuum" with gas, "calcified").
    """

    label: int
    centre: np.ndarray
    frame: np.ndarray
    height: float
    depth: float
    width: float
    canal_ap: float
    canal_lr: float
    spinous_length: float
    spinous_slope_deg: float
    physiological_concavity: float
    profile: str
    top_loss: float
    bottom_loss: float
    trabecular_hu: float
    cortex_hu: float
    cortex_mm: float
    osteophyte_mm: float = 0.0
    disc_state: str = "normal"

    @property
    def posterior_wall(self) -> float:
        """Anterior coordinate of the body's posterior wall in the mid-sagittal plane."""
        return -0.44 * self.depth

    @property
    def measuring_points(self) -> tuple[float, float, float]:
        """Anterior coordinates of the posterior, middle and anterior height measuring points."""
        middle = 0.5 * (self.posterior_wall + 0.5 * self.depth)
        half = 0.5 * (0.5 * self.depth - self.posterior_wall)
        return (middle - 0.75 * half, middle, middle + 0.75 * half)

    @property
    def body_centroid(self) -> np.ndarray:
        """World position of the centre of the body's extent (the VerSe body centroid)."""
        middle = self.measuring_points[1]
        return self.centre + self.frame[1] * middle

    def endplate_losses(self, anterior: np.ndarray, lateral: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Collapse of the top and bottom endplate (fraction of height) at body coordinates."""
        back, middle, front = self.measuring_points
        half = 0.5 * (front - back) / 0.75
        v = (anterior - middle) / half
        w = lateral / (0.5 * self.width)
        r2 = v * v + w * w
        physiological = self.physiological_concavity * np.clip(1.0 - r2, 0.0, None)
        shape = _fracture_shape(self.profile, v, r2)
        top = np.maximum(physiological, self.top_loss * shape)
        bottom = np.maximum(physiological, self.bottom_loss * shape)
        return top, bottom

    @property
    def height_loss(self) -> float:
        """Ground-truth height loss: 1 - (smallest of the three Genant heights) / height."""
        points = np.asarray(self.measuring_points)
        top, bottom = self.endplate_losses(points, np.zeros(3))
        return float(np.max(top + bottom))


def _fracture_shape(profile: str, v: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """Relative collapse (1 at the worst measuring point) of a fracture profile over the endplate."""
    if profile == "wedge":
        return np.clip((v + 0.75) / 1.5, 0.0, 1.25)
    if profile == "biconcave":
        return np.clip(1.0 - r2 / 0.95**2, 0.0, 1.0)
    if profile == "crush":
        return 0.85 + 0.15 * np.clip((v + 0.75) / 1.5, 0.0, 1.0)
    return np.zeros_like(v)


@dataclass(frozen=True)
class SpineModel:
    """The analytic anatomy of one phantom patient (all world mm, RAS).

    ``traits`` holds the patient-level draws (density, posture, texture, degeneration); see
    :func:`_draw_patient`.
    """

    vertebrae: tuple[VertebraShape, ...]
    torso_half_width: float
    torso_half_depth: float
    back_depth: float
    fat_mm: float
    hu: Mapping[str, float]
    texture_seed: int
    traits: Mapping[str, float] = field(default_factory=dict)

    def by_label(self, label: int) -> VertebraShape:
        for vertebra in self.vertebrae:
            if vertebra.label == label:
                return vertebra
        raise VfdetectError(f"phantom has no vertebra {label}")


@dataclass
class PhantomCase:
    """A generated case: image and mask on the same grid, annotated vertebrae and ground truth.

    ``vertebrae`` lists the vertebrae whose body centroid lies in the field of view, with grades;
    ``morphology`` (wedge/biconcave/crush/normal) and ``height_loss`` (fraction) are per label;
    ``reference_height_mm`` is each body's unfractured height. ``model`` re-renders the anatomy on
    any grid (:func:`render_labels`). The mask also labels neighbours that the field of view shows
    only in part (their body centroid lies outside it), as VerSe masks do; they are not listed.
    """

    case: str
    image: nib.Nifti1Image
    mask: nib.Nifti1Image
    vertebrae: list[Vertebra]
    morphology: dict[int, str]
    height_loss: dict[int, float]
    reference_height_mm: dict[int, float] = field(default_factory=dict)
    model: SpineModel | None = None

    @property
    def grades(self) -> dict[int, int]:
        return {vertebra.label: int(vertebra.grade or 0) for vertebra in self.vertebrae}


# ----------------------------------------------------------------------------------------------
# Drawing a patient
# ----------------------------------------------------------------------------------------------


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _frame(sagittal_deg: float, coronal_deg: float) -> np.ndarray:
    """Rows: superior, anterior, lateral unit vectors for a spine tilted by the two angles."""
    superior = _unit(np.array([math.tan(math.radians(coronal_deg)), math.tan(math.radians(sagittal_deg)), 1.0]))
    anterior = _unit(np.array([0.0, 1.0, 0.0]) - superior * superior[1])
    lateral = np.cross(anterior, superior)
    return np.stack([superior, anterior, lateral])


def _draw_fractures(rng: np.random.Generator, labels: Sequence[int], config: PhantomConfig) -> dict[int, int]:
    """Genant grade per listed label: negatives, prevalence, adjacency, level preference."""
    grades = {label: 0 for label in labels}
    candidates = [label for label in labels if _FRACTURE_WEIGHT[label] > 0]
    if not candidates or config.fracture_prevalence <= 0 or rng.random() < config.negative_fraction:
        return grades
    rate = min(1.0, config.fracture_prevalence / max(1e-9, 1.0 - config.negative_fraction))
    count = int(np.clip(rng.binomial(len(labels), rate), 1, len(candidates)))
    weights = np.array([_FRACTURE_WEIGHT[label] for label in candidates])
    chosen: list[int] = []
    while len(chosen) < count:
        neighbours = sorted(
            {candidates[i + d] for i, label in enumerate(candidates) if label in chosen for d in (-1, 1)
             if 0 <= i + d < len(candidates) and candidates[i + d] not in chosen}
        )
        if neighbours and rng.random() < config.adjacent_probability:
            label = neighbours[int(rng.integers(len(neighbours)))]
        else:
            free = np.array([label not in chosen for label in candidates])
            p = weights * free
            label = candidates[int(rng.choice(len(candidates), p=p / p.sum()))]
        chosen.append(label)
    probabilities = np.asarray(config.grade_probabilities, dtype=float)
    for label in chosen:
        grades[label] = 1 + int(rng.choice(3, p=probabilities / probabilities.sum()))
    return grades


def _draw_loss(rng: np.random.Generator, grade: int) -> float:
    """A height loss inside the grade's band, away from its edges."""
    low, high = {1: (0.21, 0.24), 2: (0.27, 0.38), 3: (0.43, 0.58)}[grade]
    return float(rng.uniform(low, high))


def _scaled_amplitude(profile: str, target: float, top_share: float, concavity: float) -> tuple[float, float]:
    """Top/bottom fracture amplitudes giving exactly ``target`` height loss at the worst point."""
    probe = VertebraShape(
        label=20, centre=np.zeros(3), frame=np.eye(3), height=1.0, depth=1.0, width=1.0, canal_ap=1.0,
        canal_lr=1.0, spinous_length=1.0, spinous_slope_deg=0.0, physiological_concavity=concavity,
        profile=profile, top_loss=0.0, bottom_loss=0.0, trabecular_hu=0.0, cortex_hu=0.0, cortex_mm=1.0,
    )
    low, high = 0.0, 1.5
    for _ in range(30):
        amplitude = 0.5 * (low + high)
        loss = replace(probe, top_loss=amplitude * top_share, bottom_loss=amplitude * (1 - top_share)).height_loss
        low, high = (amplitude, high) if loss < target else (low, amplitude)
    amplitude = 0.5 * (low + high)
    return amplitude * top_share, amplitude * (1 - top_share)


def _choose_levels(rng: np.random.Generator, config: PhantomConfig) -> list[int]:
    """A run of consecutive levels; abdominal scans (most of them) reach down to L4-S2."""
    count = int(rng.integers(config.min_vertebrae, config.max_vertebrae + 1))
    if config.max_length_mm is not None:
        lengths = [(_ANATOMY[label][0] + _ANATOMY[label][3]) * config.anatomy_scale for label in LEVELS]
        while count > 1:
            spans = [sum(lengths[i:i + count]) for i in range(len(LEVELS) - count + 1)]
            if min(spans) <= config.max_length_mm - 8.0:
                break
            count -= 1
    last_start = len(LEVELS) - count
    if rng.random() < config.abdominal_fraction:
        lowest = int(rng.integers(max(0, len(LEVELS) - 4 - count), last_start + 1))
        start = min(lowest, last_start)
    else:
        start = int(rng.integers(0, last_start + 1))
    levels = list(LEVELS[start:start + count])
    if config.max_length_mm is not None:
        lengths_by = {label: (_ANATOMY[label][0] + _ANATOMY[label][3]) * config.anatomy_scale for label in LEVELS}
        while len(levels) > 1 and sum(lengths_by[label] for label in levels) > config.max_length_mm - 8.0:
            levels = levels[1:] if rng.random() < 0.5 else levels[:-1]
    return levels


def _draw_patient(rng: np.random.Generator, config: PhantomConfig, osteoporotic: bool) -> dict[str, float]:
    """Patient-level traits; a fixed number of draws whatever the fracture status.

    By default none of them depends on ``osteoporotic``. With ``config.density_fracture_correlation``
    the trabecular HU and the kyphosis are mapped from the same draws onto the fracture-specific
    distributions (low density and more kyphosis in patients with fractures).
    """
    density_z = float(rng.standard_normal())
    kyphosis_u = float(rng.random())
    if config.density_fracture_correlation:
        trabecular = 105.0 + 25.0 * density_z if osteoporotic else 165.0 + 35.0 * density_z
        kyphosis = 0.8 + 0.8 * kyphosis_u if osteoporotic else 0.6 + 0.7 * kyphosis_u
    else:
        trabecular = 135.0 + 40.0 * density_z
        kyphosis = 0.6 + 1.0 * kyphosis_u
    traits = {
        "scale": config.anatomy_scale * float(rng.normal(1.0, 0.05)),
        "trabecular_hu": float(np.clip(trabecular, 55.0, 260.0)),
        "kyphosis": kyphosis,
        "cortex_hu": float(rng.uniform(380.0, 650.0)),
        "cortex_mm": float(rng.uniform(0.9, 1.6)),
        "lordosis": float(rng.uniform(0.6, 1.3)),
        "scoliosis_deg": float(rng.uniform(0.0, 7.0)),
        "scoliosis_phase": float(rng.uniform(0, 2 * math.pi)),
        "scoliosis_wavelength": float(rng.uniform(250.0, 450.0)),
        # Trabecular texture: contrast of the bone network against marrow, and its grain (mm).
        "texture_hu": float(rng.uniform(65.0, 125.0)),
        "texture_mm": float(rng.uniform(0.9, 1.5)),
        # Degeneration: share of discs narrowed, chance of a vacuum / calcified disc, osteophytes.
        "degeneration": float(rng.beta(1.2, 3.0)),
        "osteophytes": float(rng.random() < 0.4) * float(rng.uniform(1.5, 5.0)),
    }
    return traits


def _build_model(rng: np.random.Generator, listed: Sequence[int], grades: Mapping[int, int],
                 config: PhantomConfig) -> tuple[SpineModel, dict[int, str]]:
    """The anatomy of one patient: spine chain from S2 upwards, fractures, tissue HU.

    Three independent streams are spawned from ``rng``: patient traits and tissue HU, per-level
    anatomy, and fracture shapes. So for one generator state, forcing the grades on or off changes
    the fractures (and the positions they shift), never the patient's density, size, posture,
    degeneration or tissue HU.
    """
    patient_rng, level_rng, fracture_rng = rng.spawn(3)
    osteoporotic = any(grade > 0 for grade in grades.values())
    traits = _draw_patient(patient_rng, config, osteoporotic)
    scale, trabecular, kyphosis, lordosis = traits["scale"], traits["trabecular_hu"], traits["kyphosis"], traits["lordosis"]
    hu = {
        "fat": float(patient_rng.uniform(-94.0, -68.0)),
        "muscle": float(patient_rng.uniform(4.0, 24.0)),  # elderly, partly fatty paraspinal muscle
        "organ": float(patient_rng.uniform(35.0, 60.0)),
        "disc": float(patient_rng.uniform(70.0, 105.0)),
        "csf": float(patient_rng.uniform(5.0, 25.0)),
        "blood": float(patient_rng.uniform(30.0, 50.0)),
        "lung": float(patient_rng.uniform(-880.0, -820.0)),
        "air": -1000.0,
    }
    # Vessels: without contrast (40 % of scans), arterial or portal-venous phase.
    arterial = float(patient_rng.uniform(110.0, 300.0)) * float(patient_rng.random() < 0.6)
    venous_share = float(patient_rng.uniform(0.25, 1.0))
    hu["aorta"] = hu["blood"] + arterial
    hu["ivc"] = hu["blood"] + arterial * venous_share
    hu["vein"] = hu["blood"] + 0.6 * arterial * venous_share
    torso_half_width = float(patient_rng.uniform(140.0, 180.0)) * config.anatomy_scale
    torso_half_depth = float(patient_rng.uniform(95.0, 125.0)) * config.anatomy_scale
    back_depth = float(patient_rng.uniform(76.0, 92.0)) * scale
    fat_mm = float(patient_rng.uniform(*config.fat_mm)) * config.anatomy_scale
    texture_seed = int(patient_rng.integers(2**31 - 1))
    offset = patient_rng.normal(0.0, 50.0, 3).round(1)  # table and patient position
    morphology: dict[int, str] = {}
    shapes: list[VertebraShape] = []
    # Walk from S2 upwards; the tilt of each level adds the wedging of the fractures below.
    centre = np.zeros(3)
    extra_tilt = 0.0
    arc = 0.0
    previous: VertebraShape | None = None
    morphology_p = np.asarray(config.morphology_probabilities, dtype=float)
    for label in reversed(LEVELS):
        height, depth, width, disc, canal_ap, canal_lr, angle, sp_length, sp_slope = _ANATOMY[label]
        factor = 1.0 if label in _SACRAL else kyphosis if label in _THORACIC else lordosis
        sagittal = angle * factor + extra_tilt
        coronal = traits["scoliosis_deg"] * math.sin(2 * math.pi * arc / traits["scoliosis_wavelength"] + traits["scoliosis_phase"])
        frame = _frame(sagittal, coronal)
        grade = grades.get(label, 0)
        # Per-level anatomy: the same draws whether or not this level is fractured.
        concavity = float(level_rng.uniform(0.01, 0.03))
        physiological_wedge = float(level_rng.uniform(0.0, 0.07)) if label in _THORACIC else 0.0
        physiological_wedge *= float(level_rng.random() < 0.5)
        jitter = float(level_rng.normal(1.0, 0.03))
        level_trabecular = trabecular * float(level_rng.normal(1.0, 0.06)) * (1.06 if label in _THORACIC else 1.0)
        cortex_mm = traits["cortex_mm"] * float(level_rng.uniform(0.85, 1.15)) * (1.4 if label in _SACRAL else 1.0)
        disc_factor = float(level_rng.normal(1.0, 0.08))
        degenerated = level_rng.random() < traits["degeneration"] * (1.2 if label in _LUMBAR else 0.6)
        narrowing = float(level_rng.uniform(0.5, 0.85)) if degenerated else 1.0
        disc_kind = float(level_rng.random())
        osteophyte = traits["osteophytes"] * float(level_rng.uniform(0.3, 1.2)) * float(level_rng.random() < 0.7)
        if grade > 0:
            profile = MORPHOLOGIES[int(fracture_rng.choice(3, p=morphology_p / morphology_p.sum()))]
            top_share = float(fracture_rng.uniform(0.55, 1.0)) if profile == "wedge" else float(fracture_rng.uniform(0.45, 0.8))
            top_loss, bottom_loss = _scaled_amplitude(profile, _draw_loss(fracture_rng, grade), top_share, concavity)
        else:
            profile, top_loss, bottom_loss = "normal", 0.0, 0.0
            if physiological_wedge > 0:  # physiological anterior wedging, < 10 %
                profile, top_loss = "wedge", physiological_wedge
        morphology[label] = profile if grade > 0 else "normal"
        shape = VertebraShape(
            label=label, centre=centre.copy(), frame=frame, height=height * scale * jitter, depth=depth * scale * jitter,
            width=width * scale * jitter, canal_ap=canal_ap * scale, canal_lr=canal_lr * scale,
            spinous_length=sp_length * scale, spinous_slope_deg=sp_slope, physiological_concavity=concavity,
            profile=profile, top_loss=top_loss, bottom_loss=bottom_loss, trabecular_hu=level_trabecular,
            cortex_hu=traits["cortex_hu"], cortex_mm=cortex_mm,
            osteophyte_mm=0.0 if label in _SACRAL else osteophyte,
            disc_state=("normal" if not degenerated or label in _SACRAL else
                        "vacuum" if disc_kind < 0.2 else "calcified" if disc_kind < 0.35 else "narrowed"),
        )
        if previous is not None:
            below = previous
            # The disc below this level is the one between it and ``below``.
            disc_below = _ANATOMY[label][3] * scale * disc_factor * (narrowing if label not in _SACRAL else 1.0)
            # Neighbours rest on the posterior rim of the endplates (a wedge tilts, a crush sinks).
            back = np.array([below.measuring_points[0]])
            up_below = below.height * (0.5 - float(below.endplate_losses(back, np.zeros(1))[0][0]))
            back = np.array([shape.measuring_points[0]])
            down_this = shape.height * (0.5 - float(shape.endplate_losses(back, np.zeros(1))[1][0]))
            step = below.frame[0] * (up_below + 0.5 * disc_below) + frame[0] * (0.5 * disc_below + down_this)
            centre = below.centre + step
            shape = replace(shape, centre=centre.copy())
            arc += float(np.linalg.norm(step))
        shapes.append(shape)
        if profile == "wedge" and grade > 0:
            back_point, _, front_point = shape.measuring_points
            extra_tilt += math.degrees(math.atan2((top_loss + bottom_loss) * shape.height, front_point - back_point)) * 0.8
        previous = shape
    shapes.reverse()
    shapes = [replace(shape, centre=shape.centre + offset) for shape in shapes]
    model = SpineModel(
        vertebrae=tuple(shapes),
        torso_half_width=torso_half_width,
        torso_half_depth=torso_half_depth,
        back_depth=back_depth,
        fat_mm=fat_mm,
        hu=hu,
        texture_seed=texture_seed,
        traits=traits,
    )
    return model, morphology


# ----------------------------------------------------------------------------------------------
# Rendering the anatomy onto a grid
# ----------------------------------------------------------------------------------------------


class _Grid:
    """An axis-aligned RAS grid: world coordinate vectors per axis and helpers for sub-boxes."""

    def __init__(self, origin: np.ndarray, spacing: np.ndarray, shape: tuple[int, int, int]) -> None:
        self.origin = np.asarray(origin, dtype=float)
        self.spacing = np.asarray(spacing, dtype=float)
        self.shape = shape
        self.axes = [(self.origin[i] + self.spacing[i] * np.arange(shape[i])).astype(np.float32) for i in range(3)]
        self.ramp = float(np.mean(self.spacing))

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def box(self, low: np.ndarray, high: np.ndarray) -> tuple[slice, slice, slice] | None:
        start = np.floor((np.asarray(low) - self.origin) / self.spacing).astype(int)
        stop = np.ceil((np.asarray(high) - self.origin) / self.spacing).astype(int) + 1
        start = np.clip(start, 0, self.shape)
        stop = np.clip(stop, 0, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]

    def local(self, box: tuple[slice, slice, slice], centre: np.ndarray, frame: np.ndarray) -> list[np.ndarray]:
        """Coordinates of the box voxels along the rows of ``frame`` (broadcast 3D arrays)."""
        offsets = [self.axes[i][box[i]] - np.float32(centre[i]) for i in range(3)]
        out = []
        for row in frame.astype(np.float32):
            out.append(
                (offsets[0] * row[0])[:, None, None] + (offsets[1] * row[1])[None, :, None] + (offsets[2] * row[2])[None, None, :]
            )
        return out


def _capsule(u: np.ndarray, v: np.ndarray, w: np.ndarray, start: Sequence[float], stop: Sequence[float],
             radius: float, stretch: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Approximate signed distance to a capsule; ``stretch`` > 1 thins it along that axis."""
    p = [(u - start[0]) * stretch[0], (v - start[1]) * stretch[1], (w - start[2]) * stretch[2]]
    d = np.array([(stop[i] - start[i]) * stretch[i] for i in range(3)])
    length2 = float(d @ d) or 1e-9
    s = np.clip((p[0] * d[0] + p[1] * d[1] + p[2] * d[2]) / length2, 0.0, 1.0)
    return np.sqrt((p[0] - s * d[0]) ** 2 + (p[1] - s * d[1]) ** 2 + (p[2] - s * d[2]) ** 2) - radius


def _ellipse_sdf(a: np.ndarray, b: np.ndarray, ra: float | np.ndarray, rb: float | np.ndarray) -> np.ndarray:
    return (np.sqrt((a / ra) ** 2 + (b / rb) ** 2) - 1.0) * np.minimum(ra, rb)


_Part = tuple[tuple[float, float, float], tuple[float, float, float], object]


def _vertebra_parts(shape: VertebraShape) -> list[_Part]:
    """The vertebra's solid parts other than the body: (local box low, high, signed-distance function).

    Local coordinates are (superior, anterior, lateral) mm from ``shape.centre``.
    """
    h, wd = shape.height, shape.width
    lumbar = shape.label in _LUMBAR or shape.label in _SACRAL
    sacral = shape.label in _SACRAL
    canal_v = shape.posterior_wall - shape.canal_ap
    lam = 5.0 if lumbar else 4.0
    ped_r = (5.5 if lumbar else 4.0) * wd / 45.0 + 1.5
    ped_w = shape.canal_lr + 0.5 * ped_r
    parts: list[_Part] = []

    def capsule(start: tuple[float, float, float], stop: tuple[float, float, float], radius: float,
                stretch: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        reach = [radius / s for s in stretch]
        low = tuple(min(a, b) - r - 1.0 for a, b, r in zip(start, stop, reach, strict=True))
        high = tuple(max(a, b) + r + 1.0 for a, b, r in zip(start, stop, reach, strict=True))
        parts.append((low, high, lambda u, v, w: _capsule(u, v, w, start, stop, radius, stretch)))  # type: ignore[arg-type]

    for side in (-1.0, 1.0):
        capsule((0.15 * h, shape.posterior_wall + 5, side * ped_w), (0.15 * h, canal_v - 0.3 * shape.canal_ap, side * ped_w),
                ped_r, (0.7, 1.0, 1.0))
        if not sacral:
            # Superior articular process (lateral) meets the inferior one of the level above
            # (medial, further back) at a facet joint with a narrow gap.
            capsule((0.0, canal_v - 0.2 * shape.canal_ap, side * (shape.canal_lr + 6.5)),
                    (0.8 * h, canal_v - 0.3 * shape.canal_ap, side * (shape.canal_lr + 7.0)), 3.6)
            capsule((-0.1 * h, canal_v - 0.5 * shape.canal_ap - 2.0, side * (shape.canal_lr + 1.5)),
                    (-0.75 * h, canal_v - 0.6 * shape.canal_ap - 3.0, side * (shape.canal_lr + 1.0)), 3.4)
            tp_length, tp_back = 0.5 * wd + (26.0 if lumbar else 20.0), (2.0 if lumbar else 12.0)
            capsule((0.15 * h, canal_v, side * (shape.canal_lr + 4)), (0.1 * h, canal_v - tp_back, side * tp_length), 4.0)
        else:  # sacral ala reaching out to the sacroiliac joint
            radius = 13.0 if shape.label == 26 else 9.0
            capsule((0.0, -0.1 * shape.depth, side * 0.3 * wd), (0.05 * h, canal_v, side * (0.5 * wd + 38.0)), radius, (1.0, 0.8, 1.0))
    ring_low = (-0.6 * h - 1, canal_v - shape.canal_ap - lam - 1, -shape.canal_lr - lam - 1)
    ring_high = (0.35 * h + 1, canal_v, shape.canal_lr + lam + 1)

    def arch(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        outer = _ellipse_sdf(v - canal_v, w, shape.canal_ap + lam, shape.canal_lr + lam)
        inner = _ellipse_sdf(v - canal_v, w, shape.canal_ap, shape.canal_lr)
        return np.maximum(np.maximum(outer, -inner), np.maximum(np.maximum(v - (canal_v - 0.1 * shape.canal_ap), u - 0.35 * h), -0.6 * h - u))

    parts.append((ring_low, ring_high, arch))
    slope = math.radians(shape.spinous_slope_deg)
    sp_start = canal_v - shape.canal_ap - lam + 2.0
    capsule((-0.1 * h, sp_start, 0.0),
            (-0.1 * h - shape.spinous_length * math.sin(slope), sp_start - shape.spinous_length * math.cos(slope), 0.0),
            5.5 if lumbar else 4.0, (0.5 if lumbar else 0.75, 1.0, 1.8))
    return parts


def _body_sdf(shape: VertebraShape, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Signed distance (mm, negative inside) of the body, top endplate collapse, endplate heights."""
    h = shape.height
    section = _body_section(shape, u, v, w)
    top, bottom = shape.endplate_losses(v, w)
    total = np.minimum(top + bottom, 0.9)
    top = np.minimum(top, total)
    z_top = h * (0.5 - top)
    z_bottom = -h * (0.5 - (total - top))
    return np.maximum(section, np.maximum(u - z_top, z_bottom - u)), top, z_top, z_bottom


def _body_section(shape: VertebraShape, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Signed distance (mm) to the body's horizontal section (its side wall), ignoring the endplates."""
    waist = 1.0 - 0.06 * np.clip(1.0 - (2.0 * u / shape.height) ** 2, 0.0, 1.0)
    return np.maximum(_ellipse_sdf(v, w, 0.5 * shape.depth, 0.5 * shape.width * waist), shape.posterior_wall - 0.004 * w * w - v)


def _local_box(grid: _Grid, shape: VertebraShape, low: Sequence[float], high: Sequence[float]) -> tuple[slice, slice, slice] | None:
    corners = np.array([[a, b, c] for a in (low[0], high[0]) for b in (low[1], high[1]) for c in (low[2], high[2])])
    world = shape.centre + corners @ shape.frame
    return grid.box(world.min(axis=0), world.max(axis=0))


def _relative(inner: tuple[slice, slice, slice], outer: tuple[slice, slice, slice]) -> tuple[slice, slice, slice] | None:
    out = []
    for a, b in zip(inner, outer, strict=True):
        start, stop = max(a.start, b.start) - b.start, min(a.stop, b.stop) - b.start
        if stop <= start:
            return None
        out.append(slice(start, stop))
    return tuple(out)  # type: ignore[return-value]


def _vertebra_extent(shape: VertebraShape) -> tuple[np.ndarray, np.ndarray]:
    reach_back = shape.depth * 0.44 + 2 * shape.canal_ap + 8 + shape.spinous_length
    reach_side = 0.5 * shape.width + (52.0 if shape.label in _SACRAL else 31.0)
    drop = shape.spinous_length * math.sin(math.radians(shape.spinous_slope_deg))
    corners = []
    for du in (-0.7 * shape.height - drop - 6, 0.8 * shape.height + 6):
        for dv in (-reach_back, 0.5 * shape.depth + 3 + shape.osteophyte_mm):
            for dw in (-reach_side, reach_side):
                corners.append(shape.centre + du * shape.frame[0] + dv * shape.frame[1] + dw * shape.frame[2])
    corners_array = np.array(corners)
    return corners_array.min(axis=0), corners_array.max(axis=0)


def _render_column(grid: _Grid, model: SpineModel, hu: np.ndarray | None, rng: np.random.Generator | None = None) -> None:
    """Discs between neighbouring bodies and the fluid of the spinal canal (drawn before bone).

    The disc below a vertebra follows its ``disc_state``: a degenerated disc may hold a gas cleft
    (vacuum phenomenon) or calcifications; any disc has a slightly denser annulus than nucleus.
    """
    if hu is None:
        return
    for below, above in zip(model.vertebrae[1:], model.vertebrae[:-1], strict=True):
        centre = 0.5 * (below.centre + above.centre)
        superior = _unit(above.centre - below.centre)
        anterior = _unit(below.frame[1] + above.frame[1])
        anterior = _unit(anterior - superior * (anterior @ superior))
        frame = np.stack([superior, anterior, np.cross(anterior, superior)])
        half = 0.5 * float(np.linalg.norm(above.centre - below.centre))
        depth = 0.5 * (below.depth + above.depth)
        width = 0.5 * (below.width + above.width)
        canal_ap, canal_lr = 0.5 * (below.canal_ap + above.canal_ap), 0.5 * (below.canal_lr + above.canal_lr)
        reach = np.array([half + 2, 0.5 * depth + 4, 0.5 * width + 4])
        extent = np.abs(frame.T) @ np.array([reach[0], max(reach[1], depth + 2 * canal_ap), reach[2]])
        box = grid.box(centre - extent, centre + extent)
        if box is None:
            continue
        u, v, w = grid.local(box, centre, frame)
        length = np.abs(u) - half
        section = np.maximum(_ellipse_sdf(v, w, 0.51 * depth, 0.52 * width), -0.44 * depth - 0.004 * w * w - v)
        disc = np.clip(0.5 - np.maximum(section, length) / grid.ramp, 0.0, 1.0)
        if above.label in _SACRAL:
            disc_hu: np.ndarray | float = 0.5 * (model.hu["disc"] + below.trabecular_hu) + 100
        else:
            annulus = np.clip(1.0 + section / 6.0, 0.0, 1.0)  # outer 6 mm of the disc
            disc_hu = model.hu["disc"] + 12.0 * annulus
            if rng is not None and above.disc_state in ("vacuum", "calcified"):
                lumpy = _smooth_field(rng, u.shape, grid.spacing, 3.0)
                nucleus = _ellipse_sdf(v - 0.05 * depth, w, 0.22 * depth, 0.25 * width)
                if above.disc_state == "vacuum":  # a thin, branching gas cleft in the nucleus
                    cleft = (nucleus + 1.5 * lumpy < 0) & (np.abs(u) < 0.12 * half + 0.3 * lumpy) & (lumpy > -0.3)
                    disc_hu = np.where(cleft, -550.0 + 150.0 * lumpy, disc_hu)
                else:
                    spots = (lumpy > 1.4) & (section > -4.0)
                    disc_hu = np.where(spots, 260.0 + 80.0 * lumpy, disc_hu)
        canal = np.clip(0.5 - np.maximum(_ellipse_sdf(v + 0.44 * depth + canal_ap, w, canal_ap, canal_lr), length) / grid.ramp, 0.0, 1.0)
        region = hu[box]
        region += disc * (disc_hu - region)
        region += canal * (model.hu["csf"] - region)


def _trabecular_texture(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, grain_mm: float) -> np.ndarray:
    """Spongy bone over marrow, zero mean, unit sd: a sheet-and-rod network plus coarser heterogeneity.

    The network is the neighbourhood of the zero level set of a band-limited random field (grain
    ``grain_mm``, stretched along z where most trabeculae run); a sparser, thicker network adds the
    bright principal trabeculae and a smooth field the patchy marrow of elderly bone.
    """
    stretch = np.array([1.0, 1.0, 1.7])

    def field(sigma_mm: float) -> np.ndarray:
        noise = rng.standard_normal(shape).astype(np.float32)
        smooth = ndimage.gaussian_filter(noise, sigma_mm * stretch / spacing, truncate=3.0)
        return smooth / (smooth.std() + 1e-6)

    network = np.exp(-(field(0.55 * grain_mm) / 0.5) ** 2)
    principal = np.exp(-(field(1.1 * grain_mm) / 0.22) ** 2)
    patches = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.2 / spacing, truncate=2.5)
    patches /= patches.std() + 1e-6
    texture = network + 1.3 * principal + 0.45 * patches
    return ((texture - texture.mean()) / (texture.std() + 1e-6)).astype(np.float32)


def _osteophyte_sdf(shape: VertebraShape, u: np.ndarray, v: np.ndarray, w: np.ndarray, section: np.ndarray,
                    z_top: np.ndarray, z_bottom: np.ndarray) -> np.ndarray:
    """Signed distance of the beak-shaped spurs along the anterior and lateral rims of both endplates."""
    reach = shape.osteophyte_mm * np.clip((v / (0.5 * shape.depth) - 0.15) / 0.5, 0.0, 1.0)
    reach = reach * (0.7 + 0.3 * np.cos(3.0 * np.arctan2(w, np.abs(v) + 1e-3)) ** 2)
    safe = np.maximum(reach, 0.3)
    out_frac = np.clip(section / safe, 0.0, 1.0)
    curl = 0.6 * safe * out_frac**2  # the spur bends towards the disc
    half = 0.4 + 1.1 * (1.0 - out_frac)
    result = np.full(u.shape, 1e3, dtype=np.float32)
    for t in (u - z_top, z_bottom - u):
        spur = np.maximum(np.abs(t - curl + 0.3) - half, np.maximum(section - safe, -section - 1.0))
        result = np.minimum(result, spur)
    return np.where(reach > 0.3, result, np.float32(1e3))


def _render_vertebrae(grid: _Grid, model: SpineModel, hu: np.ndarray | None, labels: np.ndarray,
                      best: np.ndarray, rng: np.random.Generator | None = None) -> None:
    """Bone of every vertebra: cortical shell, trabecular core, fracture sclerosis; labels by nearest."""
    texture_hu = float(model.traits.get("texture_hu", 50.0))
    grain_mm = float(model.traits.get("texture_mm", 1.2))
    for shape in model.vertebrae:
        low, high = _vertebra_extent(shape)
        box = grid.box(low, high)
        if box is None:
            continue
        box_shape = tuple(s.stop - s.start for s in box)
        whole = np.full(box_shape, 1e3, dtype=np.float32)
        body = np.full(box_shape, 1e3, dtype=np.float32)
        band = None
        spur = shape.osteophyte_mm + 1.0
        body_low = (-0.5 * shape.height - spur, shape.posterior_wall - 1, -0.5 * shape.width - spur)
        body_high = (0.5 * shape.height + spur, 0.5 * shape.depth + spur, 0.5 * shape.width + spur)
        body_box = _local_box(grid, shape, body_low, body_high)
        if body_box is not None and (sub := _relative(body_box, box)) is not None:
            absolute = tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(sub, box, strict=True))
            u, v, w = grid.local(absolute, shape.centre, shape.frame)  # type: ignore[arg-type]
            body_sdf, top, z_top, z_bottom = _body_sdf(shape, u, v, w)
            if shape.osteophyte_mm > 0.3:
                section = _body_section(shape, u, v, w)
                body_sdf = np.minimum(body_sdf, _osteophyte_sdf(shape, u, v, w, section, z_top, z_bottom))
            body[sub] = body_sdf
            whole[sub] = body_sdf
            if hu is not None:
                band = np.zeros(box_shape, dtype=np.float32)
                if shape.profile != "normal" and max(shape.top_loss, shape.bottom_loss) > 0.1:
                    band[sub] = 140.0 * np.clip(1.0 - (z_top - u) / 5.0, 0.0, 1.0) * np.clip(top / 0.2, 0.0, 1.0)
                vein = _capsule(u, v, w, (0.0, shape.posterior_wall + 1.0, 0.0), (0.0, shape.posterior_wall + 7.0, 0.0), 1.6)
                band[sub] += np.where(vein < 0, 0.5 * (model.hu["vein"] - shape.trabecular_hu), 0.0)
                to_plate = np.minimum(z_top - u, u - z_bottom)
                if rng is not None:
                    # Subchondral sclerosis of uneven thickness and density under the endplates.
                    uneven = _smooth_field(rng, band[sub].shape, grid.spacing, 5.0)
                    plate_mm = np.float32(1.8) + np.float32(0.7) * uneven
                    plate_hu = np.float32(150.0) + np.float32(50.0) * _smooth_field(rng, band[sub].shape, grid.spacing, 7.0)
                    band[sub] += plate_hu * np.clip(1.0 - to_plate / plate_mm, 0.0, 1.0)
                    band[sub] += texture_hu * _trabecular_texture(rng, band[sub].shape, grid.spacing, grain_mm)
                else:
                    band[sub] += 90.0 * np.clip(1.0 - to_plate / 2.5, 0.0, 1.0)
        for part_low, part_high, function in _vertebra_parts(shape):
            part_box = _local_box(grid, shape, part_low, part_high)
            if part_box is None or (sub := _relative(part_box, box)) is None:
                continue
            absolute = tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(sub, box, strict=True))
            u, v, w = grid.local(absolute, shape.centre, shape.frame)  # type: ignore[arg-type]
            np.minimum(whole[sub], function(u, v, w), out=whole[sub])  # type: ignore[operator]
        region_best = best[box]
        inside = (whole < 0) & (whole < region_best)
        labels[box][inside] = shape.label
        region_best[inside] = whole[inside]
        if hu is None:
            continue
        occupancy = np.clip(0.5 - whole / grid.ramp, 0.0, 1.0)
        if rng is not None:  # cortex of uneven thickness and density
            uneven = _smooth_field(rng, box_shape, grid.spacing, 6.0)
            cortex_mm = shape.cortex_mm * (1.0 + 0.3 * np.clip(uneven, -2.0, 2.0))
            cortex_hu = shape.cortex_hu * (1.0 + 0.12 * _smooth_field(rng, box_shape, grid.spacing, 4.0))
        else:
            cortex_mm = np.full(box_shape, shape.cortex_mm, dtype=np.float32)
            cortex_hu = np.full(box_shape, shape.cortex_hu, dtype=np.float32)
        shell = np.clip((whole + np.where(body < 0, 1.0, 1.4) * cortex_mm) / grid.ramp + 0.5, 0.0, 1.0)
        core = np.where(body < 0, shape.trabecular_hu, shape.trabecular_hu + 90.0)  # arches: denser, thick cortex
        if band is not None:
            core += band
        bone = core + (cortex_hu - core) * shell
        region = hu[box]
        region += occupancy * (bone - region)


def _spine_path(model: SpineModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body-centre x and y of the spine as increasing-z tables (for torso-level structures)."""
    centres = np.array([shape.body_centroid for shape in model.vertebrae])[::-1]
    return centres[:, 2], centres[:, 0], centres[:, 1]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, feature_mm: float) -> np.ndarray:
    """Smooth random field (zero mean, unit sd roughly) with features of about ``feature_mm``."""
    coarse_shape = tuple(max(2, int(math.ceil(n * s / feature_mm)) + 2) for n, s in zip(shape, spacing, strict=True))
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, 0.7)
    coarse /= coarse.std() + 1e-6
    coordinates = [np.linspace(0.5, c - 1.5, n, dtype=np.float32) for c, n in zip(coarse_shape, shape, strict=True)]
    # Separable linear interpolation, axis by axis (far cheaper than a 3D map_coordinates).
    out = coarse
    for axis, coordinate in enumerate(coordinates):
        low = np.floor(coordinate).astype(int)
        frac = (coordinate - low).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, low, axis=axis) * (1 - frac) + np.take(out, low + 1, axis=axis) * frac
    return out.astype(np.float32)


def _render_torso(grid: _Grid, model: SpineModel, rng: np.random.Generator) -> np.ndarray:
    """Soft tissue, fat, muscles, organs, gas, lungs and air, as HU float32."""
    x, y, z = grid.axes
    zs, xs, ys = _spine_path(model)
    spine_x = np.interp(z, zs, xs)[None, None, :]
    spine_y = np.interp(z, zs, ys)[None, None, :]
    level_z = {shape.label: float(shape.body_centroid[2]) for shape in model.vertebrae}
    widths = np.interp(z, zs, [model.by_label(label).width for label in
                               [s.label for s in model.vertebrae][::-1]])[None, None, :]
    depths = np.interp(z, zs, [s.depth for s in model.vertebrae][::-1])[None, None, :]
    scale = float(np.median(widths)) / 40.0
    # Torso: ellipse whose back lies behind the spinous processes; wider at the pelvis.
    pelvis_widening = np.clip((level_z[22] - z) / 80.0, 0.0, 1.0)[None, None, :] * 20.0 * scale
    half_width = model.torso_half_width + pelvis_widening
    half_depth = model.torso_half_depth
    back = spine_y - model.back_depth - model.fat_mm
    torso_cy = back + half_depth
    dx = x[:, None, None] - spine_x
    dy = y[None, :, None] - torso_cy
    radius = np.sqrt((dx / half_width) ** 2 + (dy / half_depth) ** 2)
    mean_radius = 0.5 * (half_width + half_depth)
    depth_in = (1.0 - radius) * mean_radius  # mm inside the skin (approximate)
    hu = np.full(grid.shape, model.hu["air"], dtype=np.float32)
    body = np.clip(0.5 + depth_in / grid.ramp, 0.0, 1.0)
    texture = _smooth_field(rng, grid.shape, grid.spacing, 18.0)
    fat_fraction = np.clip((texture + 0.1) / 0.25, 0.0, 1.0)
    visceral = model.hu["organ"] + (model.hu["fat"] - model.hu["organ"]) * fat_fraction
    tissue = np.where(depth_in < model.fat_mm, model.hu["fat"],
                      np.where(depth_in < model.fat_mm + 10.0, model.hu["muscle"], visceral)).astype(np.float32)
    dyspine = y[None, :, None] - spine_y
    # Paraspinal muscles behind the spine, psoas beside the lumbar bodies.
    paraspinal = ((dx / (62.0 * scale)) ** 2 + ((dyspine + 0.55 * model.back_depth) / (0.5 * model.back_depth + 8.0)) ** 2) < 1.0
    psoas_radius = np.clip((level_z[19] - z) / (level_z[19] - level_z[24] + 1e-6), 0.0, 1.0)[None, None, :] * 22.0 * scale
    psoas = ((np.abs(dx) - 0.5 * widths - psoas_radius - 4.0) ** 2 + (dyspine - 5.0) ** 2) < psoas_radius**2
    muscle = (paraspinal | psoas) & (depth_in >= model.fat_mm)
    # Muscle with fatty streaks along the fibres (a field stretched cranio-caudally).
    streaks = _smooth_field(rng, grid.shape, grid.spacing * np.array([1.0, 1.0, 0.3]), 5.0)
    marbled = model.hu["muscle"] + 7.0 * streaks + (model.hu["fat"] - model.hu["muscle"]) * 0.6 * np.clip(streaks - 1.5, 0.0, 1.0)
    tissue = np.where(muscle, marbled, tissue)
    # Aorta in front-left of the spine; liver right, kidneys beside the psoas.
    aorta = ((dx + 18.0 * scale) ** 2 + (dyspine - 0.5 * depths - 14.0 * scale) ** 2) < (11.0 * scale) ** 2
    aorta &= (z[None, None, :] > level_z[23])
    kidney_z = np.clip(1.0 - np.abs(z - 0.5 * (level_z[19] + level_z[22])) / (0.6 * abs(level_z[19] - level_z[22]) + 1e-6), 0, 1)
    kidneys = ((np.abs(dx) - 68.0 * scale) / (28.0 * scale)) ** 2 + ((dyspine - 5.0) / (22.0 * scale)) ** 2 < kidney_z[None, None, :]
    liver_z = (z < level_z[15] + 20) & (z > level_z[21])
    liver = (dx > 10.0 * scale) & (dyspine > 0.5 * depths + 5) & (depth_in > model.fat_mm + 12) & liver_z[None, None, :]
    tissue = np.where(liver | kidneys, model.hu["organ"] + 15.0, tissue)
    # Inferior vena cava right-anterior of the spine, flatter than the aorta, up to the confluence at L5.
    ivc = ((dx - 22.0 * scale) / (13.0 * scale)) ** 2 + ((dyspine - 0.5 * depths - 12.0 * scale) / (9.0 * scale)) ** 2 < 1.0
    ivc &= (z[None, None, :] > level_z[24])
    tissue = np.where(ivc, model.hu["ivc"], tissue)
    tissue = np.where(aorta, model.hu["aorta"], tissue)
    # Bowel gas in the anterior abdomen, below the liver and above the pelvic floor.
    gas_z = (z < level_z[21]) & (z > level_z[29] - 30)
    gas = (texture > 1.9) & (dyspine > 0.5 * depths + 35) & (depth_in > model.fat_mm + 15) & gas_z[None, None, :]
    tissue = np.where(gas, model.hu["air"] + 100.0, tissue)
    # Lungs inside the rib cage above a domed diaphragm, around the mediastinum and the spine.
    dome = level_z[17] + 25.0 * scale * np.clip(1.0 - ((np.abs(dx) - 65 * scale) / (70 * scale)) ** 2 - ((dyspine - 40 * scale) / (90 * scale)) ** 2, -1.2, 1.0)
    lungs = (z[None, None, :] > dome) & (depth_in > model.fat_mm + 14.0) & ~paraspinal
    lungs &= ((dx + 12 * scale) / (50.0 * scale)) ** 2 + ((dyspine - 0.5 * depths - 55.0 * scale) / (62.0 * scale)) ** 2 > 1.0
    lungs &= (dx / (0.5 * widths + 14.0)) ** 2 + (dyspine / (0.5 * depths + 16.0)) ** 2 > 1.0
    lungs &= (z[None, None, :] < level_z[8] + 25)
    lung_hu = model.hu["lung"] + 25.0 * texture
    tissue = np.where(lungs, lung_hu, tissue)
    hu += body * (tissue - hu)
    hu += (np.float32(6.0) * texture) * body
    return hu


def _upsample(array: np.ndarray, coarse: _Grid, fine: _Grid) -> np.ndarray:
    """Separable linear interpolation of a coarse-grid array onto a finer grid with the same origin."""
    out = array
    for axis in range(3):
        position = (fine.axes[axis] - np.float32(coarse.origin[axis])) / np.float32(coarse.spacing[axis])
        low = np.clip(np.floor(position).astype(int), 0, array.shape[axis] - 2)
        frac = (position - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, low, axis=axis) * (1 - frac) + np.take(out, low + 1, axis=axis) * frac
    return np.ascontiguousarray(out, dtype=np.float32)


def _render_ribs_and_pelvis(grid: _Grid, model: SpineModel, hu: np.ndarray, ribs: bool = True, pelvis: bool = True) -> None:
    """Ribs at T1-T12 and iliac wings beside S1-S2 (bone drawn over the soft tissue)."""
    x, y, z = grid.axes
    thoracic = [shape for shape in model.vertebrae if shape.label in _THORACIC]
    bone_hu = float(np.mean([s.trabecular_hu for s in model.vertebrae])) + 60.0
    cortex_hu = model.vertebrae[0].cortex_hu
    if thoracic and ribs:
        heads = np.array([s.body_centroid[2] + 0.25 * s.height for s in thoracic])
        order = np.argsort(heads)
        heads = heads[order]
        xs = np.array([s.body_centroid[0] for s in thoracic])[order]
        ys = np.array([s.body_centroid[1] for s in thoracic])[order]
        drop_max = 45.0 * model.vertebrae[0].height / 16.0
        band = grid.box(np.array([-1e9, -1e9, heads.min() - drop_max - 15]), np.array([1e9, 1e9, heads.max() + 15]))
        if band is not None:
            zb = z[band[2]]
            cx = np.interp(zb, heads, xs)[None, None, :]
            cy = np.interp(zb, heads, ys)[None, None, :] + 35.0
            rx = model.torso_half_width - model.fat_mm - 18.0
            ry = model.torso_half_depth - 0.5 * model.fat_mm - 10.0
            ry = np.minimum(ry, 70.0)
            dx = x[:, None, None] - cx
            dy = y[None, :, None] - cy
            angle = np.arctan2(np.abs(dx) / rx, -dy / ry)  # 0 behind, pi in front
            radial = (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - 1.0) * 0.5 * (rx + ry)
            drop = drop_max * (1.0 - np.cos(0.5 * np.clip(angle, 0.0, math.pi)))
            unrolled = zb[None, None, :] + drop
            nearest = np.interp(unrolled, heads, heads)
            index = np.clip(np.searchsorted(heads, unrolled), 1, len(heads) - 1)
            lower, upper = heads[index - 1], heads[index]
            nearest = np.where(np.abs(unrolled - lower) < np.abs(unrolled - upper), lower, upper)
            dz = unrolled - nearest
            inside = ((radial / 3.5) ** 2 + (dz / 6.0) ** 2)
            valid = (angle > 0.22) & (angle < 2.3) & (unrolled < heads.max() + 8) & (unrolled > heads.min() - 8)
            rib = np.clip((1.0 - np.sqrt(inside)) * 3.0 / grid.ramp + 0.5, 0.0, 1.0) * valid
            shell = np.clip((np.sqrt(inside) - 0.6) * 4.0, 0.0, 1.0)
            rib_hu = bone_hu + (0.7 * cortex_hu - bone_hu) * shell
            region = hu[band]
            region += rib * (rib_hu - region)
    labels = {s.label for s in model.vertebrae}
    if 26 in labels and pelvis:
        s1 = model.by_label(26)
        crest = model.by_label(23).body_centroid[2] if 23 in labels else s1.centre[2] + 70
        bottom = s1.centre[2] - 70.0
        band = grid.box(np.array([-1e9, -1e9, bottom]), np.array([1e9, 1e9, crest + 5]))
        if band is not None:
            zb = z[band[2]]
            t = np.clip((zb - bottom) / (crest - bottom), 0.0, 1.0)[None, None, :]
            dx = x[:, None, None] - s1.centre[0]
            dy = y[None, :, None] - (s1.centre[1] - 5.0)
            rx = (55.0 + 55.0 * t) * s1.width / 48.0
            ry = (45.0 + 25.0 * t) * s1.width / 48.0
            radial = (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - 1.0) * 0.5 * (rx + ry)
            thickness = 4.0 + 6.0 * (1.0 - t)
            angle = np.arctan2(np.abs(dx) / rx, -dy / ry)
            valid = (angle > 0.5) & (angle < 2.0 - 0.6 * t) & (t < 1.0)
            distance = np.abs(radial) - thickness
            wing = np.clip(0.5 - distance / grid.ramp, 0.0, 1.0) * valid
            shell = np.clip((distance + 1.5) / grid.ramp + 0.5, 0.0, 1.0)
            wing_hu = bone_hu + (0.8 * cortex_hu - bone_hu) * shell
            region = hu[band]
            region += wing * (wing_hu - region)


def render_labels(model: SpineModel, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Vertebra label image (uint8, VerSe labels) of ``model`` on an axis-aligned RAS grid.

    ``affine`` must be diagonal with positive spacing (any origin); used by the tests to measure
    the generated bodies on fine grids.
    """
    affine = np.asarray(affine, dtype=float)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(np.diag(affine)[:3] <= 0):
        raise VfdetectError("render_labels needs an axis-aligned RAS affine with positive spacing")
    grid = _Grid(affine[:3, 3], np.diag(affine)[:3], tuple(int(n) for n in shape))  # type: ignore[arg-type]
    labels = np.zeros(grid.shape, dtype=np.uint8)
    best = np.full(grid.shape, np.inf, dtype=np.float32)
    _render_vertebrae(grid, model, None, labels, best)
    return labels


def render_vertebra_labels(model: SpineModel, label: int, spacing: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Label image of vertebra ``label`` alone, whole, on a fine RAS grid; returns (labels, affine)."""
    vertebra = model.by_label(label)
    low, high = _vertebra_extent(vertebra)
    shape = tuple(int(n) for n in np.ceil((high - low) / spacing) + 1)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = low
    return render_labels(replace(model, vertebrae=(vertebra,)), affine, shape), affine  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Acquisition: field of view, sub-slices, blur, noise, orientation
# ----------------------------------------------------------------------------------------------


def _acquire(model: SpineModel, listed: Sequence[int], rng: np.random.Generator,
             config: PhantomConfig) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    inplane = float(rng.uniform(*config.inplane_spacing_mm))
    weights = np.asarray(config.slice_spacing_weights, dtype=float)
    slice_spacing = float(config.slice_spacing_choices[int(rng.choice(len(weights), p=weights / weights.sum()))])
    sub = max(1, int(math.ceil(slice_spacing / 1.0 - 1e-6)))
    top_shape, bottom_shape = model.by_label(listed[0]), model.by_label(listed[-1])
    z_top = top_shape.body_centroid[2] + float(rng.uniform(0.15, 0.9)) * top_shape.height
    z_bottom = bottom_shape.body_centroid[2] - float(rng.uniform(0.15, 0.9)) * bottom_shape.height
    if config.max_length_mm is not None and z_top - z_bottom > config.max_length_mm:
        excess = z_top - z_bottom - config.max_length_mm
        z_top -= 0.5 * excess
        z_bottom += 0.5 * excess
    n_slices = max(2, int(round((z_top - z_bottom) / slice_spacing)))
    fov = float(rng.uniform(*config.fov_mm))
    n_inplane = int(round(fov / inplane))
    centres = np.array([model.by_label(label).body_centroid for label in listed])
    centre_x = float(np.mean(centres[:, 0])) + float(rng.normal(0, 0.04 * fov))
    centre_y = float(np.mean(centres[:, 1])) - config.fov_posterior_shift * fov + float(rng.normal(0, 0.03 * fov))
    origin = np.array([centre_x - 0.5 * (n_inplane - 1) * inplane, centre_y - 0.5 * (n_inplane - 1) * inplane,
                       z_bottom - 0.5 * (sub - 1) * slice_spacing / sub])
    render = _Grid(origin, np.array([inplane, inplane, slice_spacing / sub]), (n_inplane, n_inplane, n_slices * sub))
    # Soft tissue, ribs and pelvis are smooth enough for a coarser grid, upsampled afterwards.
    coarse_step = render.spacing * np.array([2.0, 2.0, max(1, round(2.0 / render.spacing[2]))])
    coarse_shape = tuple(int(math.ceil((n - 1) * f / c)) + 2 for n, f, c in zip(render.shape, render.spacing, coarse_step, strict=True))
    coarse = _Grid(render.origin, coarse_step, coarse_shape)  # type: ignore[arg-type]
    texture_rng = np.random.default_rng(model.texture_seed)
    hu_coarse = _render_torso(coarse, model, texture_rng)
    if config.ribs or config.pelvis:
        _render_ribs_and_pelvis(coarse, model, hu_coarse, ribs=config.ribs, pelvis=config.pelvis)
    hu = _upsample(hu_coarse, coarse, render)
    del hu_coarse
    labels_fine = np.zeros(render.shape, dtype=np.uint8)
    best = np.full(render.shape, np.inf, dtype=np.float32)
    _render_column(render, model, hu, texture_rng)
    _render_vertebrae(render, model, hu, labels_fine, best, texture_rng)
    noise_sd = float(rng.uniform(*config.noise_sd_hu))
    blur_mm = float(rng.uniform(*config.blur_sigma_mm))
    sigma = blur_mm / inplane
    # White noise before the blur gives correlated, CT-like grain; sub-slices average into slices.
    gain = 1.0 / (2.0 * math.sqrt(math.pi) * max(sigma, 0.3)) * (1.0 / math.sqrt(sub))
    hu += rng.standard_normal(render.shape, dtype=np.float32) * np.float32(noise_sd / gain)
    ndimage.gaussian_filter1d(hu, sigma, axis=0, output=hu, truncate=3.0)
    ndimage.gaussian_filter1d(hu, sigma, axis=1, output=hu, truncate=3.0)
    if sub > 1:
        hu = hu.reshape(n_inplane, n_inplane, n_slices, sub).mean(axis=3)
        labels = labels_fine[:, :, sub // 2::sub]
    else:
        labels = labels_fine
    slice_origin = origin.copy()
    slice_origin[2] = z_bottom
    ras_affine = np.diag([inplane, inplane, slice_spacing, 1.0])
    ras_affine[:3, 3] = slice_origin
    orientation = config.orientations[int(rng.integers(len(config.orientations)))]
    image_array = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    image_array, affine = _reorient(image_array, ras_affine, orientation)
    label_array, _ = _reorient(labels, ras_affine, orientation)
    image = nib.Nifti1Image(image_array, affine)
    mask = nib.Nifti1Image(label_array.astype(np.uint8), affine)
    for img in (image, mask):
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = b"vfdetect phantom (synthetic CT, HU)"
    return image, mask


def _reorient(array: np.ndarray, ras_affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """Store a RAS-ordered array in another axis order; returns the array and its affine."""
    ras = nib.orientations.axcodes2ornt("RAS")
    target = nib.orientations.axcodes2ornt(tuple(code))
    transform = nib.orientations.ornt_transform(ras, target)
    out = nib.orientations.apply_orientation(array, transform)
    affine = ras_affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out), affine


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def generate_phantom(case: str, rng: np.random.Generator, config: PhantomConfig = PhantomConfig()) -> PhantomCase:
    """Draw and render one synthetic patient (deterministic for the generator's state)."""
    listed = _choose_levels(rng, config)
    grades = _draw_fractures(rng, listed, config)
    model, morphology = _build_model(rng, listed, grades, config)
    image, mask = _acquire(model, listed, rng, config)
    shape = image.shape
    inverse = np.linalg.inv(image.affine)
    vertebrae = []
    for label in listed:
        position = model.by_label(label).body_centroid
        voxel = inverse[:3, :3] @ position + inverse[:3, 3]
        if np.all(voxel >= -0.5) and np.all(voxel <= np.asarray(shape) - 0.5):
            vertebrae.append(Vertebra(label, (float(position[0]), float(position[1]), float(position[2])), grades[label]))
    listed_labels = [v.label for v in vertebrae]
    return PhantomCase(
        case=case,
        image=image,
        mask=mask,
        vertebrae=vertebrae,
        morphology={label: morphology[label] for label in listed_labels},
        height_loss={label: model.by_label(label).height_loss for label in listed_labels},
        reference_height_mm={label: model.by_label(label).height for label in listed_labels},
        model=model,
    )


def case_seeds(seed: int, n_cases: int) -> list[np.random.SeedSequence]:
    """Independent seed sequences per case (case i depends only on ``seed`` and ``i``)."""
    return np.random.SeedSequence(seed).spawn(n_cases)


def _case_name(index: int) -> str:
    return f"phantom{index:03d}"


def _generate_and_write(args: tuple[Path, int, np.random.SeedSequence, PhantomConfig]) -> tuple[str, dict[int, int], str, str]:
    out_dir, index, seed_sequence, config = args
    case = _case_name(index)
    phantom = generate_phantom(case, np.random.default_rng(seed_sequence), config)
    image_name, centroid_name, mask_name = f"{case}_ct.nii.gz", f"{case}_ctd.json", f"{case}_msk.nii.gz"
    with atomic_path(out_dir / image_name) as tmp:
        nib.save(phantom.image, tmp)
    with atomic_path(out_dir / mask_name) as tmp:
        nib.save(phantom.mask, tmp)
    write_centroids(out_dir / centroid_name, phantom.vertebrae, phantom.image.affine)
    return case, phantom.grades, image_name, centroid_name


def write_phantom_dataset(out_dir: Path, n_cases: int, seed: int, config: PhantomConfig = PhantomConfig(),
                          quiet: bool = False, workers: int = 1) -> Path:
    """Write ``n_cases`` phantoms (CT, centroid JSON, mask) plus manifest.csv and grades.csv.

    Deterministic for ``seed`` whatever ``workers`` is (each case has its own seed sequence).
    Returns the manifest path.
    """
    if n_cases < 1:
        raise VfdetectError(f"number of phantom cases must be at least 1, got {n_cases}")
    if workers < 1:
        raise VfdetectError(f"number of workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, index, sequence, config) for index, sequence in enumerate(case_seeds(seed, n_cases))]
    progress = tqdm(total=n_cases, desc="phantoms", unit="case", disable=quiet)
    results = []
    if workers == 1:
        for job in jobs:
            results.append(_generate_and_write(job))
            progress.update()
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(workers, n_cases)) as pool:
            for result in pool.imap(_generate_and_write, jobs):
                results.append(result)
                progress.update()
    progress.close()
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["case", "image", "centroids"])
    grades_text = io.StringIO()
    grade_writer = csv.writer(grades_text, lineterminator="\n")
    grade_writer.writerow(["case", "label", "grade"])
    for case, grades, image_name, centroid_name in results:
        writer.writerow([case, image_name, centroid_name])
        for label, grade in grades.items():
            grade_writer.writerow([case, label, grade])
    write_text_atomic(out_dir / "grades.csv", grades_text.getvalue())
    manifest_path = out_dir / "manifest.csv"
    write_text_atomic(manifest_path, manifest.getvalue())
    return manifest_path


# ----------------------------------------------------------------------------------------------
# Measurement (real CT and phantoms alike)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BodyMeasurement:
    """Morphometry and HU of one vertebral body, mm and HU; NaN where the scan cuts it off.

    Heights are measured along the local spine axis (from the neighbouring centroids) in the
    mid-sagittal plane at the posterior, middle and anterior points (at 75 % of the half-depth from
    the body's middle); ``disc_height_below_mm`` is the gap to the next caudal body along the line
    joining the centroids. ``trabecular_hu`` is the median HU of the body interior >= 3 mm from its
    surface, ``cortex_hu`` the mean and ``cortex_p90_hu`` the 90th percentile of the body's rim
    voxels, ``disc_hu`` the mean HU in the middle third of the disc below.

    Texture of the trabecular bone: ``trabecular_sd_hu`` is the median, over the interior voxels,
    of the HU standard deviation in a window of about 3 x 3 x 3 mm (at least 2 voxels a side)
    around each (noise included, as the network sees it); ``trabecular_psd_slope`` the slope of log power against log spatial
    frequency (0.08-0.42 cycles/mm) of a Hann-windowed 12 mm cube sampled at 1 mm in the middle of
    the body (steeper: smoother, coarser texture; NaN where the cube does not fit in the body).
    """

    label: int
    height_posterior_mm: float
    height_middle_mm: float
    height_anterior_mm: float
    depth_mm: float
    width_mm: float
    disc_height_below_mm: float = float("nan")
    trabecular_hu: float = float("nan")
    cortex_hu: float = float("nan")
    cortex_p90_hu: float = float("nan")
    disc_hu: float = float("nan")
    trabecular_sd_hu: float = float("nan")
    trabecular_psd_slope: float = float("nan")

    @property
    def heights(self) -> tuple[float, float, float]:
        return (self.height_posterior_mm, self.height_middle_mm, self.height_anterior_mm)

    def height_loss(self, reference_height_mm: float) -> float:
        """1 - (smallest Genant height) / ``reference_height_mm``."""
        return 1.0 - min(self.heights) / reference_height_mm


class _LineSampler:
    """Trilinear samples of a volume at world points; NaN outside the grid."""

    def __init__(self, array: np.ndarray, affine: np.ndarray) -> None:
        self.array = np.asarray(array, dtype=np.float32)
        self.inverse = np.linalg.inv(np.asarray(affine, dtype=float))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        voxels = points @ self.inverse[:3, :3].T + self.inverse[:3, 3]
        return ndimage.map_coordinates(self.array, voxels.T, order=1, mode="constant", cval=np.nan)

    def exit_distance(self, origin: np.ndarray, direction: np.ndarray, step: float = 0.1, reach: float = 90.0) -> float:
        """Distance from ``origin`` along ``direction`` to where the indicator drops below 0.5."""
        distances = np.arange(0.0, reach, step)
        values = self(origin[None, :] + distances[:, None] * direction[None, :])
        if not values[0] >= 0.5:
            return float("nan")
        below = np.flatnonzero(~(values >= 0.5))
        if below.size == 0:
            return float("nan")
        i = int(below[0])
        if not np.isfinite(values[i]):
            return float("nan")
        fraction = (values[i - 1] - 0.5) / (values[i - 1] - values[i])
        return float(distances[i - 1] + fraction * step)


def _height_at(sampler: _LineSampler, point: np.ndarray, superior: np.ndarray, lateral: np.ndarray, step_mm: float) -> float:
    """Median over three parallel lines (1.5 mm apart laterally) of the body's extent along ``superior``."""
    values = []
    for side in (-1.5, 0.0, 1.5):
        origin = point + lateral * side
        values.append(sampler.exit_distance(origin, superior, step_mm) + sampler.exit_distance(origin, -superior, step_mm))
    return float(np.median(values))


def _neighbour_axis(label: int, centroids: Mapping[int, np.ndarray]) -> np.ndarray:
    order = sorted(centroids, key=_rank)
    i = order.index(label)
    above = centroids[order[i - 1]] if i > 0 else centroids[label]
    below = centroids[order[i + 1]] if i + 1 < len(order) else centroids[label]
    if np.allclose(above, below):
        return np.array([0.0, 0.0, 1.0])
    axis = _unit(np.asarray(above, dtype=float) - np.asarray(below, dtype=float))
    return axis if axis[2] >= 0 else -axis


def _rank(label: int) -> int:
    from vfdetect.vertebrae import spine_rank

    return spine_rank(label)


def measure_vertebral_bodies(labels: np.ndarray, affine: np.ndarray, centroids: Mapping[int, Sequence[float]],
                             hu: np.ndarray | None = None, step_mm: float = 0.1) -> dict[int, BodyMeasurement]:
    """Measure every vertebral body named in ``centroids`` (world mm body centroids).

    ``labels`` is a whole-vertebra label image (VerSe numbering) on the grid ``affine``; ``hu``
    an optional CT on the same grid for the tissue HU. Lines are sampled with trilinear
    interpolation of each vertebra's indicator, so heights are sub-voxel on fine grids.
    """
    labels = np.asarray(labels)
    affine = np.asarray(affine, dtype=float)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    points = {int(k): np.asarray(v, dtype=float) for k, v in centroids.items()}
    order = sorted(points, key=_rank)
    results: dict[int, BodyMeasurement] = {}
    hu_sampler = _LineSampler(hu, affine) if hu is not None else None
    for label in order:
        indicator = labels == label
        if not indicator.any():
            continue
        box = ndimage.find_objects(indicator.astype(np.uint8))[0]
        pad = [slice(max(0, s.start - 2), min(n, s.stop + 2)) for s, n in zip(box, labels.shape, strict=True)]
        sub_affine = affine.copy()
        sub_affine[:3, 3] = affine[:3, :3] @ np.array([s.start for s in pad]) + affine[:3, 3]
        sub_indicator = indicator[tuple(pad)]
        sampler = _LineSampler(sub_indicator, sub_affine)
        centre = points[label]
        superior = _neighbour_axis(label, points)
        voxels = np.argwhere(sub_indicator)
        mass = (sub_affine[:3, :3] @ voxels.mean(axis=0)) + sub_affine[:3, 3]
        anterior = centre - mass
        anterior = anterior - superior * (anterior @ superior)
        if np.linalg.norm(anterior) < 1e-3:
            anterior = np.array([0.0, 1.0, 0.0]) - superior * superior[1]
        anterior = _unit(anterior)
        lateral = np.cross(anterior, superior)
        forward = sampler.exit_distance(centre, anterior, step_mm)
        backward = sampler.exit_distance(centre, -anterior, step_mm)
        middle = centre + anterior * 0.5 * (forward - backward)
        half = 0.5 * (forward + backward)

        posterior_h, middle_h, anterior_h = (
            _height_at(sampler, middle + anterior * offset, superior, lateral, step_mm) for offset in (-0.75 * half, 0.0, 0.75 * half)
        )
        widths = []
        for offset in (-2.0, 0.0, 2.0):
            origin = middle + superior * offset
            widths.append(sampler.exit_distance(origin, lateral, step_mm) + sampler.exit_distance(origin, -lateral, step_mm))
        width = float(np.median(widths))
        measurement = BodyMeasurement(label, posterior_h, middle_h, anterior_h, 2 * half, width)
        i = order.index(label)
        if i + 1 < len(order) and (labels == order[i + 1]).any():
            below_label = order[i + 1]
            segment = points[below_label] - centre
            length = float(np.linalg.norm(segment))
            direction = segment / length
            leave = sampler.exit_distance(centre, direction, step_mm, reach=length)
            below_sampler = _LineSampler(labels == below_label, affine)
            enter = length - below_sampler.exit_distance(points[below_label], -direction, step_mm, reach=length)
            gap = (enter - leave) * abs(float(direction @ superior))
            disc_hu = float("nan")
            if hu_sampler is not None and np.isfinite(gap) and gap > 0:
                samples = []
                for fraction in np.linspace(0.35, 0.65, 4):
                    origin = centre + direction * (leave + fraction * (enter - leave))
                    for da in (-4.0, 0.0, 4.0):
                        for dl in (-4.0, 0.0, 4.0):
                            samples.append(origin + anterior * da + lateral * dl)
                disc_hu = float(np.nanmean(hu_sampler(np.array(samples))))
            measurement = replace(measurement, disc_height_below_mm=float(gap), disc_hu=disc_hu)
        if hu is not None and np.isfinite(half) and np.isfinite(middle_h) and np.isfinite(width):
            region = tuple(pad)
            inside_distance = ndimage.distance_transform_edt(sub_indicator, sampling=spacing)
            grid_points = np.argwhere(np.ones(sub_indicator.shape, dtype=bool))
            world = grid_points @ sub_affine[:3, :3].T + sub_affine[:3, 3]
            offset = world - middle
            t = (offset @ superior).reshape(sub_indicator.shape)
            a = (offset @ anterior).reshape(sub_indicator.shape)
            lat = (offset @ lateral).reshape(sub_indicator.shape)
            ellipsoid = (t / (0.5 * middle_h)) ** 2 + (a / half) ** 2 + (lat / (0.5 * width)) ** 2
            ct = np.asarray(hu)[region]
            core = sub_indicator & (inside_distance >= 3.0) & (ellipsoid < 1.0)
            rim = sub_indicator & (inside_distance <= max(1.5, float(spacing.min()) + 1e-3)) & (ellipsoid < 1.3) & (a > -half + 1.0)
            if core.any():
                measurement = replace(measurement, trabecular_hu=float(np.median(ct[core])),
                                      trabecular_sd_hu=_local_sd(ct, core, spacing))
            if hu_sampler is not None:
                frame = np.stack([superior, anterior, lateral])
                measurement = replace(measurement, trabecular_psd_slope=_spectrum_slope(hu_sampler, sampler, middle, frame))
            if rim.any():
                measurement = replace(measurement, cortex_hu=float(np.mean(ct[rim])),
                                      cortex_p90_hu=float(np.percentile(ct[rim], 90)))
        results[label] = measurement
    return results


def _local_sd(ct: np.ndarray, core: np.ndarray, spacing: np.ndarray, window_mm: float = 3.0) -> float:
    """Median over ``core`` voxels of the HU standard deviation in a ~``window_mm`` box around each."""
    size = [max(2, int(round(window_mm / float(s)))) for s in spacing]
    values = np.asarray(ct, dtype=np.float64)
    mean = ndimage.uniform_filter(values, size=size)
    square = ndimage.uniform_filter(values * values, size=size)
    inner = ndimage.binary_erosion(core, structure=np.ones(size, dtype=bool))
    if not inner.any():
        return float("nan")
    return float(np.median(np.sqrt(np.clip(square - mean * mean, 0.0, None))[inner]))


def _spectrum_slope(hu_sampler: _LineSampler, indicator: _LineSampler, middle: np.ndarray, frame: np.ndarray,
                    side: int = 12, band: tuple[float, float] = (0.08, 0.42)) -> float:
    """Log-log slope of the radially averaged power spectrum of a 1 mm cube in the body's frame."""
    steps = np.arange(side, dtype=float) - 0.5 * (side - 1)
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    points = middle[None, :] + grid @ frame
    inside = indicator(points)
    values = hu_sampler(points)
    if not (np.all(inside >= 0.5) and np.all(np.isfinite(values))):
        return float("nan")
    cube = values.reshape(side, side, side)
    hann = np.hanning(side + 2)[1:-1]
    window = hann[:, None, None] * hann[None, :, None] * hann[None, None, :]
    power = np.abs(np.fft.fftn((cube - cube.mean()) * window)) ** 2
    frequencies = np.fft.fftfreq(side)
    fx, fy, fz = np.meshgrid(frequencies, frequencies, frequencies, indexing="ij")
    radius = np.sqrt(fx**2 + fy**2 + fz**2).ravel()
    edges = np.arange(0.5, side // 2 + 1) / side
    index = np.digitize(radius, edges)
    centres, means = [], []
    for i in range(1, len(edges)):
        chosen = index == i
        centre = 0.5 * (edges[i - 1] + edges[i])
        if chosen.any() and band[0] <= centre <= band[1]:
            centres.append(centre)
            means.append(float(power.ravel()[chosen].mean()))
    if len(centres) < 3 or min(means) <= 0:
        return float("nan")
    return float(np.polyfit(np.log(centres), np.log(means), 1)[0])


def measure_soft_tissue(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                        centroids: Mapping[int, Sequence[float]]) -> dict[str, float]:
    """Median HU of paraspinal muscle and of body fat, and the HU spread within muscle.

    Muscle: 6 mm spheres 30 mm behind each body's posterior wall and 25 mm to each side (the
    erector spinae), voxels within the muscle window -29..150 HU. Fat: voxels of the image smoothed
    by a 3-voxel box filter within the fat window -190..-30 HU. ``muscle_sd_hu`` approximates image
    noise plus texture.
    """
    hu = np.asarray(hu, dtype=np.float32)
    affine = np.asarray(affine, dtype=float)
    measurements = measure_vertebral_bodies(labels, affine, centroids)
    points = {int(k): np.asarray(v, dtype=float) for k, v in centroids.items()}
    sampler = _LineSampler(hu, affine)
    samples = []
    offsets = np.array([(a, b, c) for a in range(-6, 7, 2) for b in range(-6, 7, 2) for c in range(-6, 7, 2)
                        if a * a + b * b + c * c <= 36], dtype=float)
    for label, measurement in measurements.items():
        if not np.isfinite(measurement.depth_mm):
            continue
        superior = _neighbour_axis(label, points)
        voxels = np.argwhere(labels == label)
        mass = (affine[:3, :3] @ voxels.mean(axis=0)) + affine[:3, 3]
        anterior = _unit((points[label] - mass) - superior * ((points[label] - mass) @ superior))
        lateral = np.cross(anterior, superior)
        back = points[label] - anterior * (0.5 * measurement.depth_mm + 30.0)
        for side in (-25.0, 25.0):
            samples.append(sampler(back + lateral * side + offsets))
    values = np.concatenate(samples) if samples else np.array([np.nan])
    values = values[np.isfinite(values) & (values >= -29) & (values <= 150)]
    # Fat on a 3-voxel box-smoothed image, so that noise in muscle does not leak into the fat window.
    smoothed = ndimage.uniform_filter(hu, size=3)
    fat = smoothed[(smoothed > -500) & (smoothed >= -190) & (smoothed <= -30)]
    return {
        "muscle_hu": float(np.median(values)) if values.size else float("nan"),
        "muscle_sd_hu": float(np.std(values)) if values.size else float("nan"),
        "fat_hu": float(np.median(fat)) if fat.size else float("nan"),
    }
