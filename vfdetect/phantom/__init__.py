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

Modules, in the order of the data flow:

* :mod:`~vfdetect.phantom.config`: :class:`PhantomConfig`, levels, Genant bands, anatomy tables;
* :mod:`~vfdetect.phantom.anatomy`: :class:`VertebraShape`, :class:`SpineModel` and the draws of a patient;
* :mod:`~vfdetect.phantom.grid`: the rendering grid, signed distances, smooth random fields;
* :mod:`~vfdetect.phantom.spine`: vertebrae, discs and canal onto a grid; label images;
* :mod:`~vfdetect.phantom.torso`: soft tissue, organs, vessels, lungs, ribs and pelvis;
* :mod:`~vfdetect.phantom.scanner`: field of view, spacing, blur, noise, stored orientation;
* :mod:`~vfdetect.phantom.dataset`: :func:`generate_phantom` and :func:`write_phantom_dataset`;
* :mod:`~vfdetect.phantom.measure`: body morphometry and tissue HU of any CT and mask.
"""

from __future__ import annotations

from vfdetect.phantom.anatomy import SpineModel, VertebraShape
from vfdetect.phantom.config import GENANT_BANDS, LEVELS, MORPHOLOGIES, PhantomConfig
from vfdetect.phantom.dataset import PhantomCase, case_seeds, generate_phantom, write_phantom_dataset
from vfdetect.phantom.measure import BodyMeasurement, measure_soft_tissue, measure_vertebral_bodies
from vfdetect.phantom.spine import render_labels, render_vertebra_labels

__all__ = [
    "LEVELS",
    "GENANT_BANDS",
    "MORPHOLOGIES",
    "PhantomConfig",
    "PhantomCase",
    "SpineModel",
    "VertebraShape",
    "BodyMeasurement",
    "case_seeds",
    "generate_phantom",
    "write_phantom_dataset",
    "render_labels",
    "render_vertebra_labels",
    "measure_vertebral_bodies",
    "measure_soft_tissue",
]
