"""Compression fractures planted in real CT scans that have vertebra masks.

A real scan with a vertebra instance mask becomes a scan with Genant-graded fractures whose
height loss is *measured*, not assumed. Each fractured vertebral body collapses through a smooth,
invertible deformation in the vertebra's own frame:

* **frame** (world RAS mm): ``superior`` points from the caudal to the cranial neighbour's centroid
  (body centroids when a body mask is given, else whole-vertebra centroids), not along an image
  axis; ``anterior`` is the body centroid minus the whole-vertebra centroid, made orthogonal to
  ``superior``; ``lateral`` is their cross product. The frame's origin is the body centroid.
* **warp**: a backward map ``x_in = x_out + d(x_out) * superior`` with the displacement ``d`` along
  the superior axis only. Along every line parallel to that axis ``d`` is piecewise linear in the
  superior coordinate ``s``: zero up to the top of the caudal neighbour, then the inferior endplate
  moves up by ``delta_bottom``, the body between the endplates is compressed uniformly, the
  superior endplate moves down by ``delta_top``, and the disc above stretches to fill the gap up to
  the bottom of the cranial neighbour, beyond which ``d`` is zero again. ``delta_top`` and
  ``delta_bottom`` vary over the body's cross-section (the morphology: ``wedge`` mostly anterior,
  ``biconcave`` central, ``crush`` uniform) and taper smoothly to zero a few millimetres outside it,
  so soft tissue next to the body follows smoothly. The field is then smoothed with a 0.5 mm
  Gaussian. The Jacobian determinant of such a map is ``1 + dd/ds``; every segment of the profile
  is increasing, so it is positive by construction, and it is computed and reported (a map with a
  determinant <= 0 anywhere is refused). Neighbouring vertebrae lie where ``d = 0``: they do not move.
* **resampling**: the CT with linear interpolation, masks with nearest neighbour, on a sub-box
  around the vertebra, everything on the input's own grid (shape, affine, header and dtype).

Heights are measured on the vertebral-body mask (given, or approximated from the vertebra mask as
the part anterior of the plane through the whole vertebra's centre of mass, normal to
``anterior``): along the superior axis, in the mid-sagittal plane, at the anterior, middle and
posterior points (75 % of the half-depth in front of / behind the body's middle), each the median
of three lines 2 mm apart laterally, sampled every 0.1 mm on the trilinearly interpolated
indicator (the continuous warped indicator for a fractured body, so sub-voxel changes count).

**Height loss** = ``1 - min(Ha_after / Ha_before, Hm_after / Hm_before, Hp_after / Hp_before)``: the
largest relative loss of the three heights, each against the same vertebra's own height at the
same point before the fracture (so an unfractured body has loss 0 whatever its natural shape). A
fractured vertebra's loss lies inside its Genant band (grade 1: 20-25 %, 2: 25-40 %, 3: 40-60 %);
the amplitude is found by bisection and the morphology redrawn a few times when a band cannot
be reached. Unfractured vertebrae change by less than 3 % (they are checked after every fracture of
the scan is planted).

Arrays are indexed ``[i, j, k]`` of their affine (nibabel's voxel -> world RAS mm).

Modules, in the order of the data flow:

* :mod:`~vfdetect.simulate.config`: :class:`SimulationConfig`, Genant bands, morphologies, :func:`parse_levels`;
* :mod:`~vfdetect.simulate.inputs`: manifest rows (:func:`read_simulation_manifest`) and checked scan and masks;
* :mod:`~vfdetect.simulate.frame`: :class:`VertebraFrame`, neighbours, approximate bodies;
* :mod:`~vfdetect.simulate.measure`: :class:`BodyHeights` measured on a body indicator;
* :mod:`~vfdetect.simulate.warp`: the deformation, its footprints and Jacobian, resampling;
* :mod:`~vfdetect.simulate.fracture`: grade and morphology draws, amplitude bisection, compaction;
* :mod:`~vfdetect.simulate.acquisition`: crop, noise, rotation, orientation and dtype of a copy;
* :mod:`~vfdetect.simulate.scan`: :func:`simulate_scan` and its records;
* :mod:`~vfdetect.simulate.dataset`: :func:`simulate_dataset`, NIfTI and preview writing.
"""

from __future__ import annotations

from vfdetect.simulate.config import GENANT_BANDS, MORPHOLOGIES, SimulationConfig, parse_levels
from vfdetect.simulate.dataset import simulate_dataset, write_preview_png
from vfdetect.simulate.frame import VertebraFrame
from vfdetect.simulate.inputs import SourceScan, read_simulation_manifest
from vfdetect.simulate.measure import BodyHeights
from vfdetect.simulate.scan import SimulatedScan, VertebraOutcome, simulate_scan

__all__ = [
    "MORPHOLOGIES",
    "GENANT_BANDS",
    "SimulationConfig",
    "SourceScan",
    "VertebraFrame",
    "BodyHeights",
    "VertebraOutcome",
    "SimulatedScan",
    "parse_levels",
    "read_simulation_manifest",
    "simulate_scan",
    "simulate_dataset",
    "write_preview_png",
]
