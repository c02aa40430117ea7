"""The analytic anatomy of one phantom patient, and the draws that make it.

:class:`VertebraShape` is one vertebra (frame, size, fracture, bone density) with its endplate
collapse and ground-truth height loss; :class:`SpineModel` the whole patient. The draws: levels in
the field of view, fracture grades, patient traits (independent of the fractures unless
``PhantomConfig.density_fracture_correlation``), and :func:`_build_model`, which chains the
vertebrae from S2 upwards with their fractures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from vfdetect.errors import VfdetectError
from vfdetect.phantom.config import (
    _ANATOMY,
    _FRACTURE_WEIGHT,
    _LUMBAR,
    _SACRAL,
    _THORACIC,
    LEVELS,
    MORPHOLOGIES,
    PhantomConfig,
)
from vfdetect.phantom.grid import _unit


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
