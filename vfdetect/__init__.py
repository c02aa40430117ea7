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

import os as _os
import platform as _platform

# TensorFlow turns its oneDNN kernels on by default only on x86 CPUs with AVX-512 VNNI/BF16 or AMX;
# on other x86 CPUs its own Conv3D kernels run, and their gradients at a quarter of the forward rate.
# Measured on a 2-core AVX2-only CPU: a 3D training step at batch 10, 1.93 s without oneDNN, 0.60 s
# with it; whole-volume inference 281 s -> 141 s (benchmarks/README.md). Set before TensorFlow is
# imported, on x86-64 only (elsewhere TensorFlow's own choice stands); TF_ENABLE_ONEDNN_OPTS=0 in the
# environment still turns it off.
if _platform.machine().lower() in ("x86_64", "amd64"):
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
