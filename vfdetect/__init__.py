"""vfdetect: vertebral compression fracture detection in CT.

A reproduction and extension of Nicolaes et al. 2019, "Detection of vertebral fractures in CT
using 3D convolutional neural networks": a DeepMedic-style dual-pathway 3D CNN classifies every
voxel as background, normal vertebra or fractured vertebra; the probability map is aggregated
to vertebra-level and patient-level fracture scores.

Array convention used throughout the package: volumes in the internal frame are indexed
``[x, y, z]`` in canonical RAS order (x: left -> right, y: posterior -> anterior,
z: inferior -> superior), and network tensors are ``(batch, x, y, z, channel)``. Kernel
shapes are written in the same ``(x, y, z)`` order, which is also the order of the paper's
Table 1: the 1slice kernel ``1x3x3`` is one voxel wide left-right, i.e. it sees the sagittal
plane.
"""

__version__ = "0.1.0"
