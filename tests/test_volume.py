"""Tests of vfdetect.volume: loading in any geometry, the internal frame, saving back, normalisation."""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vfdetect.errors import InputError, VfdetectError
from vfdetect.volume import (
    SourceGrid,
    Volume,
    body_mask,
    internal_grid,
    load_label_image,
    load_scan,
    normalise,
    save_on_grid,
    to_internal,
    to_source,
    voxel_to_world,
    world_to_voxel,
)

SCANS = {
    "ras_3mm": "totalsegmentator-example/example_ct.nii.gz",
    "pir_oblique_2mm_slices": "verse19-sub-verse014/sub-verse014_ct.nii.gz",
    "pir_1.5mm": "tptbox-sample-ct/sub-ct_label-22_ct.nii.gz",
    "las_dicom_grid": "totalsegmentator-example/example_seg_dicom.nii.gz",
}
DICOM_SERIES = "totalsegmentator-example/example_ct_dicom"
LINEAR_WEIGHTS = np.array([0.3, -0.7, 1.1])


def world_linear_field(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """A field linear in world mm: trilinear resampling reproduces it exactly away from the edges."""
    per_index = LINEAR_WEIGHTS @ affine[:3, :3]
    constant = float(LINEAR_WEIGHTS @ affine[:3, 3]) + 5.0
    i, j, k = (np.arange(n, dtype=np.float64) * c for n, c in zip(shape, per_index, strict=True))
    return (i[:, None, None] + j[None, :, None] + k[None, None, :] + constant).astype(np.float32)


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def assert_one_line_error(error: pytest.ExceptionInfo, path: Path, words: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert words in message.lower(), message


# ------------------------------------------------------------------------------------------------
# Round trips on the real data


@pytest.mark.parametrize("name", sorted(SCANS))
def test_real_scan_round_trip_keeps_grid_and_voxels(real_data: Path, tmp_path: Path, name: str) -> None:
    source_path = real_data / SCANS[name]
    original = nib.load(source_path)
    volume, grid = load_scan(source_path)
    assert volume.shape == original.shape
    np.testing.assert_array_equal(volume.affine, original.affine)
    np.testing.assert_array_equal(volume.array, original.get_fdata(dtype=np.float32))

    # Geometry: a field linear in world mm survives load -> internal -> source exactly (up to the
    # clamped edge), so any axis flip, permutation or misplaced origin would show up here.
    linear = world_linear_field(volume.shape, volume.affine)
    internal = to_internal(Volume(linear, volume.affine))
    assert np.allclose(np.diag(internal.affine)[:3], 1.0)
    assert np.count_nonzero(internal.affine[:3, :3] - np.diag(np.diag(internal.affine[:3, :3]))) == 0
    back = to_source(internal.array, internal.affine, grid)
    assert back.shape == volume.shape
    assert np.percentile(np.abs(back - linear), 99) < 0.2
    assert np.abs(back - linear).max() < 1.0

    # Real intensities: saved on the input grid, reloaded with the same shape, affine and codes.
    internal = to_internal(volume)
    back = to_source(internal.array, internal.affine, grid)
    out = tmp_path / "round_trip.nii"
    save_on_grid(back, grid, out, dtype=np.float32)
    saved = nib.load(out)
    assert saved.shape == original.shape
    np.testing.assert_array_equal(saved.affine, original.affine)
    for code in ("sform_code", "qform_code"):
        assert int(saved.header[code]) == int(original.header[code])
    np.testing.assert_allclose(saved.header.get_qform(), original.header.get_qform(), atol=1e-5)
    np.testing.assert_allclose(saved.header.get_sform(), original.header.get_sform(), atol=1e-5)
    error = np.abs(saved.get_fdata() - volume.array)
    spread = np.percentile(volume.array, 99) - np.percentile(volume.array, 1)
    assert np.median(error) < 0.03 * spread
    correlation = np.corrcoef(saved.get_fdata().ravel(), volume.array.ravel())[0, 1]
    assert correlation > 0.94  # 1.5 mm -> 1 mm -> 1.5 mm trilinear smooths CT noise (0.956 measured)


def test_scan_and_mask_share_the_internal_grid(real_data: Path) -> None:
    # sub-verse014: the CT's affine comes from its qform, the mask's from its sform.
    scan, _ = load_scan(real_data / "verse19-sub-verse014/sub-verse014_ct.nii.gz")
    mask, mask_grid = load_label_image(real_data / "verse19-sub-verse014/sub-verse014_seg-vert_msk.nii.gz")
    assert not np.array_equal(scan.affine, mask.affine)
    internal_scan = to_internal(scan)
    internal_mask = to_internal(mask, order=0)
    assert internal_scan.shape == internal_mask.shape
    np.testing.assert_array_equal(internal_scan.affine, internal_mask.affine)
    assert internal_mask.array.dtype == np.uint8
    assert set(np.unique(internal_mask.array)) == {0, 20, 21, 22, 23, 24}
    # The lumbar labels sit on bone in the internal frame too.
    for label in (20, 22, 24):
        assert np.median(internal_scan.array[internal_mask.array == label]) > 100
    # Nearest-neighbour labels come back onto the mask grid almost unchanged.
    back = to_source(internal_mask.array, internal_mask.affine, mask_grid, order=0)
    assert back.dtype == np.uint8
    assert np.mean(back == mask.array) > 0.98
    # The grid depends only on (shape, affine, spacing).
    shape_a, affine_a = internal_grid(scan.shape, scan.affine)
    shape_b, affine_b = internal_grid(mask.shape, mask.affine)
    assert shape_a == shape_b
    np.testing.assert_array_equal(affine_a, affine_b)


def test_float_mask_is_cast_to_integer_labels(real_data: Path) -> None:
    path = real_data / "verse19-sub-verse004-annotations/sub-verse004_seg-vert_msk.nii.gz"
    assert nib.load(path).get_data_dtype() == np.float64
    mask, grid = load_label_image(path)
    assert mask.array.dtype == np.uint8
    assert set(np.unique(mask.array)) == {0, *range(16, 25)}
    assert grid.shape == (161, 338, 61)


def test_dicom_series_matches_its_nifti_conversion(real_data: Path, tmp_path: Path) -> None:
    volume, grid = load_scan(real_data / DICOM_SERIES)
    reference = nib.load(real_data / "totalsegmentator-example/example_seg_dicom.nii.gz")
    assert volume.shape == (512, 512, 20) == reference.shape
    assert nib.aff2axcodes(volume.affine) == ("L", "A", "S")
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-3)
    np.testing.assert_allclose(volume.spacing, [0.9765625, 0.9765625, 2.0])
    assert volume.array.dtype == np.float32
    assert volume.array.min() == pytest.approx(-1024.0)  # RescaleIntercept applied
    # The reference segmentation's vertebrae (T12, T11) lie on bone, its air outside lies on air.
    labels = np.asarray(reference.dataobj)
    assert np.median(volume.array[labels == 32]) > 150
    assert np.median(volume.array[:, ::-1][labels == 32]) < 100  # a row flip would miss the bone
    # Round trip through the internal frame (0.98 x 0.98 x 2 mm -> 1 mm -> back).
    internal = to_internal(volume)
    assert nib.aff2axcodes(internal.affine) == ("R", "A", "S")
    back = to_source(internal.array, internal.affine, grid)
    assert np.median(np.abs(back - volume.array)) < 15.0
    # Results save as NIfTI on the DICOM grid.
    out = tmp_path / "on_dicom_grid.nii.gz"
    save_on_grid((labels > 0).astype(np.uint8), grid, out)
    saved = nib.load(out)
    np.testing.assert_array_equal(saved.affine, volume.affine)
    assert int(saved.header["sform_code"]) == 1 and int(saved.header["qform_code"]) == 1
    labels_back, _ = load_label_image(out)
    np.testing.assert_array_equal(labels_back.affine, volume.affine)  # pairs with the series exactly
    assert isinstance(grid, SourceGrid) and grid.source.endswith("example_ct_dicom")


# ------------------------------------------------------------------------------------------------
# DICOM edge cases (modified copies and small synthetic series written with pydicom)


def write_synthetic_series(
    folder: Path,
    origins_lps: list[tuple[float, float, float]],
    pixels: list[np.ndarray],
    series_uid: str = "1.2.826.0.1.3680043.8.498.7001",
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    for index, (origin, image) in enumerate(zip(origins_lps, pixels, strict=True)):
        instance_uid = f"{series_uid}.{index + 1}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = instance_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset = Dataset()
        dataset.file_meta = meta
        dataset.SOPClassUID = CTImageStorage
        dataset.SOPInstanceUID = instance_uid
        dataset.Modality = "CT"
        dataset.SeriesInstanceUID = series_uid
        dataset.SeriesDescription = f"synthetic {series_uid[-4:]}"
        dataset.InstanceNumber = index + 1
        dataset.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        dataset.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        dataset.PixelSpacing = [f"{v}" for v in pixel_spacing]
        dataset.Rows, dataset.Columns = image.shape
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated = 16
        dataset.BitsStored = 16
        dataset.HighBit = 15
        dataset.PixelRepresentation = 0
        dataset.RescaleSlope = f"{slope}"
        dataset.RescaleIntercept = f"{intercept}"
        dataset.PixelData = np.ascontiguousarray(image, dtype=np.uint16).tobytes()
        # Files named in reverse so that directory order is not slice order.
        dataset.save_as(folder / f"slice_{len(origins_lps) - index:03d}.dcm", enforce_file_format=True)
    assert pydicom is not None


def point_pixels(rows: int, columns: int, count: int, row: int, column: int, at_slice: int) -> list[np.ndarray]:
    images = []
    for index in range(count):
        image = np.full((rows, columns), 24, dtype=np.uint16)  # -1000 HU after the intercept
        if index == at_slice:
            image[row, column] = 2024  # 1000 HU
        images.append(image)
    return images


def test_dicom_geometry_sorting_and_rescale(tmp_path: Path) -> None:
    # An oblique (rotated) series, files in reverse order, slope 2: the bright pixel lands at its
    # world position and carries the rescaled HU.
    rot = rotation([1, 2, 0.5], 25)
    row_cosine, column_cosine = rot[:, 0], rot[:, 1]
    normal = np.cross(row_cosine, column_cosine)
    base = np.array([-100.0, -150.0, 300.0])
    origins = [tuple(base + 2.5 * k * normal) for k in range(6)]
    pixels = point_pixels(12, 10, 6, row=3, column=7, at_slice=4)
    write_synthetic_series(
        tmp_path / "series", origins, pixels, orientation=(*row_cosine, *column_cosine), slope=2.0, intercept=-2048.0
    )
    volume, grid = load_scan(tmp_path / "series")
    assert volume.shape == (10, 12, 6)
    assert volume.array.max() == pytest.approx(2 * 2024 - 2048)
    assert volume.array.min() == pytest.approx(2 * 24 - 2048)
    index = np.unravel_index(np.argmax(volume.array), volume.shape)
    expected_lps = base + 4 * 2.5 * normal + 7 * 0.7 * row_cosine + 3 * 0.8 * column_cosine
    expected_ras = expected_lps * np.array([-1, -1, 1])
    np.testing.assert_allclose(voxel_to_world(volume.affine, np.array(index)), expected_ras, atol=1e-3)
    np.testing.assert_allclose(volume.spacing, [0.7, 0.8, 2.5], atol=1e-4)  # DS strings carry 4-6 decimals
    assert grid.header.get_sform(coded=True)[1] == 1


def test_dicom_gantry_tilt_is_handled_with_a_sheared_affine(tmp_path: Path) -> None:
    # Slices 2 mm apart along the normal, each origin shifted 0.7 mm posteriorly (a ~19 degree tilt).
    origins = [(-50.0, -60.0 + 0.7 * k, -100.0 + 2.0 * k) for k in range(7)]
    pixels = point_pixels(9, 8, 7, row=4, column=5, at_slice=5)
    write_synthetic_series(tmp_path / "tilt", origins, pixels)
    volume, grid = load_scan(tmp_path / "tilt")
    index = np.unravel_index(np.argmax(volume.array), volume.shape)
    expected_lps = np.array(origins[5]) + 5 * 0.7 * np.array([1, 0, 0]) + 4 * 0.8 * np.array([0, 1, 0])
    np.testing.assert_allclose(voxel_to_world(volume.affine, np.array(index)), expected_lps * [-1, -1, 1], atol=1e-3)
    assert int(grid.header["qform_code"]) == 0  # a qform cannot hold the shear
    saved = tmp_path / "tilt.nii.gz"
    save_on_grid(volume.array, grid, saved)
    np.testing.assert_allclose(nib.load(saved).affine, volume.affine, atol=1e-5)


def test_dicom_uneven_spacing_is_resampled_with_a_warning(tmp_path: Path) -> None:
    heights = [0.0, 2.0, 4.0, 8.0, 10.0]  # the slice at 6 mm is missing
    origins = [(-10.0, -10.0, z) for z in heights]
    pixels = [np.full((6, 5), 1024 + int(10 * z), dtype=np.uint16) for z in heights]  # HU = 10 * z
    write_synthetic_series(tmp_path / "gap", origins, pixels)
    with pytest.warns(UserWarning, match="uneven slice spacing"):
        volume, _ = load_scan(tmp_path / "gap")
    assert volume.shape == (5, 6, 6)
    np.testing.assert_allclose(volume.spacing[2], 2.0)
    np.testing.assert_allclose(volume.array[0, 0, :], [0, 20, 40, 60, 80, 100], atol=1e-3)


def test_dicom_uneven_real_series(real_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "missing_slice"
    shutil.copytree(real_data / DICOM_SERIES, folder)
    files = sorted(folder.iterdir())
    files[7].unlink()
    with pytest.warns(UserWarning, match="resampled onto an even 2 mm grid"):
        volume, _ = load_scan(folder)
    full, _ = load_scan(real_data / DICOM_SERIES)
    assert volume.shape == full.shape
    np.testing.assert_allclose(volume.affine, full.affine, atol=1e-6)


def test_dicom_folder_with_two_series_is_refused(real_data: Path, tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index, source in enumerate(sorted((real_data / DICOM_SERIES).iterdir())):
        dataset = pydicom.dcmread(source)
        dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.11" if index < 12 else "1.2.826.0.1.3680043.8.498.22"
        dataset.save_as(folder / source.name)
    with pytest.raises(InputError) as error:
        load_scan(folder)
    assert_one_line_error(error, folder, "2 dicom series")
    assert "1.2.826.0.1.3680043.8.498.11" in str(error.value) and "1.2.826.0.1.3680043.8.498.22" in str(error.value)
    assert "12 files" in str(error.value) and "8 files" in str(error.value)


def test_dicom_missing_pydicom_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from vfdetect.errors import MissingDependencyError

    real_import = builtins.__import__

    def refuse_pydicom(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError("no pydicom")
        return real_import(name, *args, **kwargs)

    (tmp_path / "series").mkdir()
    monkeypatch.setattr(builtins, "__import__", refuse_pydicom)
    with pytest.raises(MissingDependencyError, match="pip install pydicom"):
        load_scan(tmp_path / "series")


# ------------------------------------------------------------------------------------------------
# Synthetic geometry


def test_oblique_anisotropic_round_trip(tmp_path: Path) -> None:
    affine = np.eye(4)
    affine[:3, :3] = rotation([0.3, -1.0, 0.4], 17) @ np.diag([0.8, 0.8, 2.5])
    affine[:3, 3] = [-40.0, 25.0, -300.0]
    shape = (40, 36, 14)
    linear = world_linear_field(shape, affine)
    image = nib.Nifti1Image(linear, affine)
    path = tmp_path / "oblique.nii"
    nib.save(image, path)
    volume, grid = load_scan(path)
    internal = to_internal(volume, spacing=1.0)
    inside = world_to_voxel(affine, voxel_to_world(internal.affine, np.indices(internal.shape).reshape(3, -1).T))
    inside = np.all((inside > 0.5) & (inside < np.array(shape) - 1.5), axis=1).reshape(internal.shape)
    expected = world_linear_field(internal.shape, internal.affine)
    value_range = float(linear.max() - linear.min())
    assert np.abs(internal.array - expected)[inside].max() < 1e-4 * value_range  # float32 rounding only
    assert np.all(internal.array[~inside] <= linear.max() + 1e-3)
    back = to_source(internal.array, internal.affine, grid)
    interior = (slice(1, -1),) * 3
    assert np.abs(back - linear)[interior].max() < 1e-4 * value_range
    out = tmp_path / "oblique_back.nii.gz"
    save_on_grid(back, grid, out)
    saved = nib.load(out)
    assert saved.shape == shape
    np.testing.assert_array_equal(saved.affine, nib.load(path).affine)


def test_internal_grid_is_ras_isotropic_and_covers_the_input() -> None:
    affine = np.array([[0, 0, -2.0, 50], [-0.7, 0, 0, 10], [0, 1.3, 0, -20], [0, 0, 0, 1]])
    shape = (30, 20, 10)
    out_shape, out_affine = internal_grid(shape, affine, spacing=1.5)
    np.testing.assert_array_equal(np.diag(out_affine)[:3], [1.5, 1.5, 1.5])
    corners = voxel_to_world(affine, np.array(np.meshgrid([0, 29], [0, 19], [0, 9], indexing="ij")).reshape(3, -1).T)
    index = world_to_voxel(out_affine, corners)
    assert index.min() > -1e-3
    assert np.all(index.max(axis=0) <= np.array(out_shape) - 1 + 1e-3)
    assert np.all(index.max(axis=0) > np.array(out_shape) - 2)
    assert internal_grid(shape, affine.copy(), 1.5)[0] == out_shape
    # Fill outside: minimum for images, 0 for labels.
    image = np.full(shape, 7.0, dtype=np.float32)
    image[0, 0, 0] = -900.0
    internal = to_internal(Volume(image, affine), spacing=1.5)
    assert internal.array.min() == pytest.approx(-900.0)
    labels = to_internal(Volume(np.full(shape, 5, dtype=np.uint8), affine), spacing=1.5, order=0)
    assert labels.array.dtype == np.uint8 and set(np.unique(labels.array)) <= {0, 5}


def test_to_source_handles_channels() -> None:
    affine = np.diag([-1.5, 2.0, 1.0, 1.0])
    shape = (12, 10, 9)
    grid = SourceGrid(shape, affine, nib.Nifti1Header(), "test")
    first = world_linear_field(shape, affine)
    stacked = Volume(np.stack([first, 2 * first], axis=-1), affine)
    internal = to_internal(stacked)
    assert internal.array.shape == internal.shape + (2,)
    back = to_source(internal.array, internal.affine, grid)
    assert back.shape == shape + (2,)
    np.testing.assert_allclose(back[..., 1], 2 * back[..., 0], rtol=1e-5, atol=1e-4)
    # Exact inside; the outermost voxels may move by the clamped-edge effect (a fraction of a voxel).
    np.testing.assert_allclose(back[1:-1, 1:-1, 1:-1, 0], first[1:-1, 1:-1, 1:-1], atol=1e-3)
    np.testing.assert_allclose(back[..., 0], first, atol=0.3 * 2.0 * 0.7)


@pytest.mark.parametrize("oblique", [False, True])
def test_to_source_in_box_equals_the_full_resampling(oblique: bool) -> None:
    """A map that is background outside a box: resampling only the block of the input grid that sees
    the box gives the full resampling there, and the background everywhere else."""
    from vfdetect.frame import to_source_in_box

    linear = np.diag([-0.8, 1.3, -2.0])  # flipped axes, anisotropic
    if oblique:
        linear = rotation([1, 2, 0], 25) @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear[:, [2, 0, 1]]  # permuted: the first array axis runs closest to S
    affine[:3, 3] = [10.0, -5.0, 3.0]
    shape = (20, 36, 30)
    grid = SourceGrid(shape, affine, nib.Nifti1Header(), "test")
    internal_shape, internal_affine = internal_grid(shape, affine)
    rng = np.random.default_rng(0)
    full = np.zeros(internal_shape + (2,), dtype=np.float32)
    start, stop = np.array([8, 5, 11]), np.array([21, 17, 26])
    inner = tuple(slice(int(a) + 1, int(b) - 1) for a, b in zip(start, stop, strict=True))
    full[inner] = rng.uniform(0.1, 1.0, size=full[inner].shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    values, index = to_source_in_box(full[box], internal_affine, grid, start, order=1)
    expected = to_source(full, internal_affine, grid, order=1)
    assembled = np.zeros_like(expected)
    assembled[index] = values
    np.testing.assert_allclose(assembled, expected, atol=1e-6)
    assert 0 < values.shape[0] * values.shape[1] * values.shape[2] < 0.6 * np.prod(shape)  # a block, not the grid
    assert expected[index].max() > 0.5
    labels = (full[..., 0] > 0.5).astype(np.uint8)
    values, index = to_source_in_box(labels[box], internal_affine, grid, start, order=0)
    assembled = np.zeros(shape, dtype=np.uint8)
    assembled[index] = values
    np.testing.assert_array_equal(assembled, to_source(labels, internal_affine, grid, order=0))


def test_a_checked_scan_is_kept_for_one_load_of_the_unchanged_file(tmp_path: Path) -> None:
    from vfdetect.volume import check_ct_scan, load_scan

    array = np.full((12, 10, 8), 40, dtype=np.int16)
    array[0] = -1000
    array[5] = 700
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    check_ct_scan(path, keep=True)
    first, _ = load_scan(path)
    second, _ = load_scan(path)
    assert first.array is not second.array  # kept once, then read again
    np.testing.assert_array_equal(first.array, second.array)
    check_ct_scan(path, keep=True)
    array[1] = 300  # the file changes after the check: it is read again
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    changed, _ = load_scan(path)
    assert changed.array[1].max() == 300


def test_voxel_world_round_trip() -> None:
    affine = np.eye(4)
    affine[:3, :3] = rotation([1, 1, 0], 30) @ np.diag([0.5, 0.9, 3.0])
    affine[:3, 3] = [1, 2, 3]
    points = np.array([[0, 0, 0], [10.5, -2, 7]])
    np.testing.assert_allclose(world_to_voxel(affine, voxel_to_world(affine, points)), points, atol=1e-9)
    np.testing.assert_allclose(voxel_to_world(affine, np.zeros(3)), [1, 2, 3])


# ------------------------------------------------------------------------------------------------
# Scaling, saving, in-memory images


def test_scl_slope_is_applied_on_load_and_written_on_save(tmp_path: Path) -> None:
    stored = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = nib.Nifti1Image(stored, np.diag([1.0, 1.0, 2.0, 1.0]))
    image.header.set_data_dtype(np.int16)
    path = tmp_path / "scaled.nii.gz"
    image.to_filename(path)
    # Patch the stored scaling without touching the voxels.
    header = nib.load(path).header.copy()
    header.set_slope_inter(2.0, -1024.0)
    raw = nib.Nifti1Image(stored, image.affine, header)
    raw.header.set_slope_inter(2.0, -1024.0)
    with gzip.open(path, "wb") as handle:
        raw.header.write_to(handle)
        handle.write(stored.tobytes(order="F"))
    volume, grid = load_scan(path)
    np.testing.assert_array_equal(volume.array, stored * 2.0 - 1024.0)
    # Probabilities written as uint8 with scl_slope = 1/255; the input's own scaling is not inherited.
    probabilities = np.linspace(0, 1, stored.size).reshape(stored.shape)
    out = tmp_path / "probabilities.nii.gz"
    save_on_grid(probabilities, grid, out, scale=1 / 255)
    saved = nib.load(out)
    assert saved.get_data_dtype() == np.uint8
    assert saved.dataobj.slope == pytest.approx(1 / 255) and saved.dataobj.inter == 0
    assert np.abs(saved.get_fdata() - probabilities).max() <= 0.5 / 255 + 1e-6
    out_float = tmp_path / "float.nii.gz"
    save_on_grid(volume.array, grid, out_float)
    np.testing.assert_array_equal(nib.load(out_float).get_fdata(), volume.array)


def test_save_four_channels_and_atomicity(tmp_path: Path) -> None:
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    image = nib.Nifti1Image(np.zeros((6, 7, 5), dtype=np.int16), affine)
    volume, grid = load_scan(image)
    assert grid.source == "<in-memory image>"
    channels = np.random.default_rng(0).random((6, 7, 5, 2))
    out = tmp_path / "channels.nii.gz"
    save_on_grid(channels, grid, out, scale=1 / 255)
    saved = nib.load(out)
    assert saved.shape == (6, 7, 5, 2)
    np.testing.assert_allclose(saved.affine, affine, atol=1e-6)  # NIfTI stores float32
    np.testing.assert_array_equal(saved.affine, grid.header.get_best_affine())
    with pytest.raises(VfdetectError):
        save_on_grid(np.zeros((6, 7, 4)), grid, tmp_path / "wrong.nii.gz")
    assert not (tmp_path / "wrong.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["channels.nii.gz"]


def test_save_writes_large_maps_slab_by_slab_in_column_major_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vfdetect.volume as volume_module

    monkeypatch.setattr(volume_module, "_WRITE_CHUNK_BYTES", 100)  # a few z-slices per slab
    image = nib.Nifti1Image(np.zeros((6, 7, 9), dtype=np.int16), np.diag([0.9, 0.9, 3.0, 1.0]))
    _, grid = load_scan(image)
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 256, (6, 7, 9, 2)).astype(np.uint8)
    save_on_grid(stored, grid, tmp_path / "scaled.nii.gz", scale=1 / 255)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "scaled.nii.gz").dataobj.get_unscaled()), stored)
    labels = rng.integers(0, 3, (6, 7, 9)).astype(np.uint8)
    save_on_grid(labels, grid, tmp_path / "labels.nii", dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "labels.nii").dataobj), labels)


# ------------------------------------------------------------------------------------------------
# Body mask and normalisation


def synthetic_torso(padding: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    size = 40 + 2 * padding
    grid = np.indices((size, size, 20)).astype(np.float64)
    centre = (size - 1) / 2
    radius = np.hypot(grid[0] - centre, grid[1] - centre)
    hu = np.full((size, size, 20), -1000.0)
    body = radius < 15
    hu[body] = 40 + 100 * rng.standard_normal(np.count_nonzero(body))
    lung = np.hypot(grid[0] - centre - 5, grid[1] - centre) < 4
    hu[lung] = -850.0
    hu[2, 2, :] = 300.0  # a speck outside the body (table, noise)
    return hu.astype(np.float32)


def test_body_mask_keeps_largest_component_and_fills_holes() -> None:
    hu = synthetic_torso(padding=5)
    mask = body_mask(hu)
    centre = (hu.shape[0] - 1) / 2
    assert mask[int(centre) + 5, int(centre), 10]  # the lung (open at the top and bottom slices) is body
    assert not mask[2, 2, 10]  # the speck is not
    assert not mask[0, 0, 0]
    assert not body_mask(np.full((5, 5, 5), -1000.0)).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_body_mask_equals_slice_by_slice_hole_filling(seed: int) -> None:
    """The largest component with every slice's holes filled along each axis, as scipy fills them one
    slice at a time; bodies small in the field of view, at its edge, or with cavities open to a side."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    hu = np.full((40, 36, 30), -1000.0, dtype=np.float32)
    body = ndimage.binary_opening(ndimage.gaussian_filter(rng.random(hu.shape), 2.0) > 0.5, iterations=1)
    body[:, :, :3] = body[:, :, 3:6]  # reaches the bottom of the field of view
    if seed:  # and lies well inside it across
        body[:6] = body[30:] = body[:, :4] = body[:, 27:] = False
    cavities = ndimage.gaussian_filter(rng.random(hu.shape), 1.5) > 0.56
    hu[body & ~cavities] = 40.0
    hu[rng.random(hu.shape) > 0.999] = 500.0  # specks
    above = hu > -500.0
    labels, count = ndimage.label(above)
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:])) if count else above
    expected = largest.copy()
    four = ndimage.generate_binary_structure(2, 1)
    for axis in range(3):
        for index in range(hu.shape[axis]):
            plane = np.take(largest, index, axis=axis)
            filled = np.take(expected, index, axis=axis) | ndimage.binary_fill_holes(plane, structure=four)
            slicer: list = [slice(None)] * 3
            slicer[axis] = index
            expected[tuple(slicer)] = filled
    assert np.array_equal(body_mask(hu), expected)


def test_row_major_equals_numpy_for_every_layout() -> None:
    from vfdetect.volume import row_major

    rng = np.random.default_rng(5)
    stored = np.asfortranarray(rng.integers(-1024, 3000, size=(37, 20, 70), dtype=np.int16))
    for array in (stored, np.ascontiguousarray(stored), stored[::2, :, 1:], stored[..., None]):
        result = row_major(array, np.float32, block=8)
        assert result.flags.c_contiguous and result.dtype == np.float32
        np.testing.assert_array_equal(result, np.ascontiguousarray(array, dtype=np.float32))


def test_normalise_uses_body_statistics_only() -> None:
    narrow, wide = synthetic_torso(padding=2), synthetic_torso(padding=30)
    normal_narrow, normal_wide = normalise(narrow), normalise(wide)
    mask = body_mask(narrow)
    assert normal_narrow.dtype == np.float32
    assert abs(float(normal_narrow[mask].mean())) < 1e-4
    assert float(normal_narrow[mask].std()) == pytest.approx(1.0, abs=1e-4)
    # More air around the patient changes nothing inside the body.
    offset = 28
    np.testing.assert_allclose(normal_wide[offset:-offset, offset:-offset][mask], normal_narrow[mask], atol=1e-5)
    # Scanner padding below -1024 HU is clipped, not allowed to skew the statistics.
    padded = narrow.copy()
    padded[0, :, :] = -3024.0
    normal_padded = normalise(padded)
    np.testing.assert_allclose(normal_padded[mask], normal_narrow[mask], atol=1e-5)
    body = narrow[mask].astype(np.float64)
    assert normal_padded.min() == pytest.approx((-1024.0 - body.mean()) / body.std(), abs=1e-4)


# ------------------------------------------------------------------------------------------------
# Bad input


def save(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as error:
        load_scan(tmp_path / "absent.nii.gz")
    assert_one_line_error(error, tmp_path / "absent.nii.gz", "not found")


def test_not_a_nifti_or_dicom(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InputError) as error:
        load_scan(text)
    assert_one_line_error(error, text, "not a nifti")
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("not an image")
    with pytest.raises(InputError) as error:
        load_scan(fake)
    assert_one_line_error(error, fake, "cannot be read as nifti")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "readme.txt").write_text("no dicom here")
    with pytest.raises(InputError) as error:
        load_scan(folder)
    assert_one_line_error(error, folder, "no dicom")


def test_truncated_gzip(tmp_path: Path) -> None:
    whole = save(tmp_path / "whole.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (40, 40, 40)).astype(np.int16))
    data = whole.read_bytes()
    for name, length in (("half.nii.gz", len(data) // 2), ("stub.nii.gz", 60)):
        cut = tmp_path / name
        cut.write_bytes(data[:length])
        with pytest.raises(InputError) as error:
            load_scan(cut)
        assert_one_line_error(error, cut, "truncated")


@pytest.mark.parametrize(
    ("shape", "words"),
    [((8, 8), "2d image"), ((8, 8, 8, 3), "4d image"), ((8, 0, 8), "zero-size"), ((8, 8, 1), "single slice")],
)
def test_wrong_dimensions(tmp_path: Path, shape: tuple[int, ...], words: str) -> None:
    path = save(tmp_path / "bad.nii.gz", np.zeros(shape, dtype=np.int16))
    with pytest.raises(InputError) as error:
        load_scan(path)
    assert_one_line_error(error, path, words)


def test_trailing_singleton_dimension_is_dropped(tmp_path: Path) -> None:
    path = save(tmp_path / "singleton.nii.gz", np.ones((4, 5, 6, 1), dtype=np.int16))
    volume, grid = load_scan(path)
    assert volume.array.shape == (4, 5, 6) and grid.shape == (4, 5, 6)


def test_non_finite_voxels(tmp_path: Path) -> None:
    array = np.zeros((6, 6, 6), dtype=np.float32)
    array[1, 2, 3] = np.nan
    array[2, 2, 2] = np.inf
    path = save(tmp_path / "nan.nii.gz", array)
    with pytest.raises(InputError) as error:
        load_scan(path)
    assert_one_line_error(error, path, "2 voxel(s) are not finite")
    with pytest.raises(InputError):
        load_label_image(path)


def test_non_integer_label_image(tmp_path: Path) -> None:
    array = np.zeros((6, 6, 6), dtype=np.float32)
    array[1, 1, 1] = 2.5
    path = save(tmp_path / "labels.nii.gz", array)
    with pytest.raises(InputError) as error:
        load_label_image(path)
    assert_one_line_error(error, path, "non-integer")


def test_no_stray_warnings_for_good_input(real_data: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        volume, grid = load_scan(real_data / SCANS["pir_1.5mm"])
    assert volume.shape == grid.shape == (73, 47, 73)


def test_single_dicom_file_and_nested_folder_get_pointed_to_the_series(real_data: Path, tmp_path: Path) -> None:
    one_file = sorted((real_data / DICOM_SERIES).iterdir())[0]
    with pytest.raises(InputError) as error:
        load_scan(one_file)
    assert_one_line_error(error, one_file, "pass the folder")
    parent = tmp_path / "study"
    shutil.copytree(real_data / DICOM_SERIES, parent / "series_1")
    with pytest.raises(InputError) as error:
        load_scan(parent)
    assert_one_line_error(error, parent, "series_1")


def test_in_memory_image_and_integer_volume_fill() -> None:
    affine = np.array([[0, 0, 2.0, -30], [-1.0, 0, 0, 40], [0, -1.0, 0, 5], [0, 0, 0, 1]])
    data = np.full((10, 12, 8), -1000, dtype=np.int16)
    data[2:8, 3:9, 2:6] = 50
    image = nib.Nifti1Image(data, affine)
    volume, grid = load_scan(image)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(grid.header.get_best_affine(), image.affine)
    assert grid.source == "<in-memory image>"
    # Integer HU resampled trilinearly is filled with air (its minimum), labels with 0.
    internal = to_internal(Volume(data, affine))
    assert internal.array.min() == -1000 and internal.array.dtype == np.float32
    labels = to_internal(Volume((data > 0).astype(np.uint8) * 3, affine), order=0)
    assert labels.array.dtype == np.uint8 and labels.array.min() == 0 and labels.array.max() == 3


def test_save_refuses_values_that_do_not_fit(tmp_path: Path) -> None:
    grid = SourceGrid((4, 4, 4), np.eye(4), nib.Nifti1Header(), "test")
    with pytest.raises(VfdetectError, match="do not fit in uint8"):
        save_on_grid(np.full((4, 4, 4), 300), grid, tmp_path / "labels.nii.gz", dtype=np.uint8)
    with pytest.raises(InputError, match="must end with .nii"):
        save_on_grid(np.zeros((4, 4, 4)), grid, tmp_path / "labels.png")
    assert not any(tmp_path.iterdir())
    # A grid built by hand with a bare header still gets its affine into the file.
    affine = np.diag([2.0, -1.5, 3.0, 1.0])
    affine[:3, 3] = [10, 20, -30]
    save_on_grid(np.ones((4, 4, 4)), SourceGrid((4, 4, 4), affine, nib.Nifti1Header(), "test"), tmp_path / "x.nii")
    np.testing.assert_array_equal(nib.load(tmp_path / "x.nii").affine, affine)


def test_nifti2_and_big_endian_inputs_save_back(tmp_path: Path) -> None:
    data = (np.arange(60, dtype=np.int16).reshape(3, 4, 5) * 10 - 100).astype(">i2")
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine, nib.Nifti1Header(endianness=">")), tmp_path / "big_endian.nii.gz")
    nib.save(nib.Nifti2Image(data.astype(np.int16), affine), tmp_path / "nifti2.nii")
    for name in ("big_endian.nii.gz", "nifti2.nii"):
        volume, grid = load_scan(tmp_path / name)
        np.testing.assert_array_equal(volume.array, data)
        out = tmp_path / f"out_{name}"
        save_on_grid(volume.array * 2, grid, out)
        saved = nib.load(out)
        np.testing.assert_array_equal(saved.get_fdata(), data * 2.0)
        np.testing.assert_array_equal(saved.affine, affine)


def test_frame_and_dicom_names_are_importable_from_volume() -> None:
    from vfdetect import dicom, frame, volume

    for name in ("Volume", "SourceGrid", "internal_grid", "to_internal", "to_source", "voxel_to_world", "world_to_voxel"):
        assert getattr(volume, name) is getattr(frame, name)
    assert volume.load_dicom_series is dicom.load_dicom_series


def test_truncated_dicom_slice_is_named_truncated_not_compressed(tmp_path: Path) -> None:
    origins = [(0.0, 0.0, 2.0 * k) for k in range(4)]
    write_synthetic_series(tmp_path / "series", origins, point_pixels(8, 6, 4, row=2, column=3, at_slice=1))
    victim = sorted((tmp_path / "series").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-40])  # cut inside the pixel data
    with pytest.raises(InputError, match="truncated or corrupt") as caught:
        load_scan(tmp_path / "series")
    assert "pylibjpeg" not in str(caught.value) and victim.name in str(caught.value)
