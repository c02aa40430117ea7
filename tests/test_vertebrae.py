"""Tests of vfdetect.vertebrae (names, centroid files, masks) and vfdetect.manifest (grade tables, manifests)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vfdetect.errors import InputError, VfdetectError
from vfdetect.manifest import (
    Case,
    read_grades,
    read_manifest,
    read_verse19_manifest_table,
    read_verse19_vertebra_data,
    verse19_case_id,
    write_grades,
    write_manifest,
)
from vfdetect.vertebrae import (
    LABEL_NAMES,
    PAPER_LEVELS,
    SPINE_ORDER,
    TOTALSEGMENTATOR_V2_TO_VERSE,
    Vertebra,
    axis_codes,
    centroids_from_mask,
    load_centroids,
    read_centroids,
    vertebra_label,
    vertebra_name,
    write_centroids,
)

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "data_manifests"
VERSE014 = "verse19-sub-verse014"
VERSE004 = "verse19-sub-verse004-annotations"


def _voxel(affine: np.ndarray, position_mm) -> np.ndarray:
    return np.linalg.solve(affine[:3, :3], np.asarray(position_mm) - affine[:3, 3])


def _mask(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj).astype(np.int32), image


def _single_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------------------------------------- names


def test_names_follow_verse_numbering_with_s2_extension():
    assert [vertebra_name(label) for label in (1, 7, 8, 19, 20, 24, 25, 26, 27, 28, 29)] == [
        "C1", "C7", "T1", "T12", "L1", "L5", "L6", "S1", "Co", "T13", "S2",
    ]  # fmt: skip
    assert vertebra_label("l1") == 20 and vertebra_label("T12") == 19 and vertebra_label("sacrum") == 26
    assert sorted(SPINE_ORDER) == sorted(LABEL_NAMES)
    assert SPINE_ORDER.index(19) + 1 == SPINE_ORDER.index(28) == SPINE_ORDER.index(20) - 1  # T12, T13, L1
    assert [vertebra_name(label) for label in PAPER_LEVELS] == [
        *(f"T{n}" for n in range(1, 13)), *(f"L{n}" for n in range(1, 6)), "S1", "S2",
    ]  # fmt: skip
    with pytest.raises(VfdetectError):
        vertebra_name(30)
    with pytest.raises(VfdetectError):
        vertebra_label("X9")


def test_vertebra_value_checks_and_properties():
    vertebra = Vertebra(20, (1, 2, 3), 2)
    assert vertebra.name == "L1" and vertebra.fractured is True and vertebra.position_mm == (1.0, 2.0, 3.0)
    assert Vertebra(20, (0, 0, 0), 0).fractured is False and Vertebra(20, (0, 0, 0)).fractured is None
    with pytest.raises(VfdetectError, match="Genant"):
        Vertebra(20, (0, 0, 0), 4)
    with pytest.raises(VfdetectError):
        Vertebra(31, (0, 0, 0))
    with pytest.raises(VfdetectError):
        Vertebra(20, (0, float("nan"), 0))


def test_totalsegmentator_mapping_is_explicit():
    expected = {26: "S1", 27: "L5", 31: "L1", 32: "T12", 33: "T11", 43: "T1", 44: "C7", 50: "C1"}
    assert {key: vertebra_name(TOTALSEGMENTATOR_V2_TO_VERSE[key]) for key in expected} == expected
    assert 25 not in TOTALSEGMENTATOR_V2_TO_VERSE  # TotalSegmentator's "sacrum" has no VerSe level


# ------------------------------------------------------------------------------------- real centroids


def test_verse014_centroids_land_in_their_mask_label_on_the_ct_grid(real_data):
    ct = nib.load(str(real_data / VERSE014 / "sub-verse014_ct.nii.gz"))
    mask, mask_image = _mask(real_data / VERSE014 / "sub-verse014_seg-vert_msk.nii.gz")
    assert np.allclose(ct.affine, mask_image.affine, atol=1e-4) and ct.shape == mask.shape
    assert axis_codes(ct.affine) == ("P", "I", "R")
    vertebrae = read_centroids(real_data / VERSE014 / "sub-verse014_seg-vb_ctd.json", ct.affine, ct.shape)
    assert [vertebra.name for vertebra in vertebrae] == ["L1", "L2", "L3", "L4", "L5"]
    for vertebra in vertebrae:
        index = tuple(np.rint(_voxel(ct.affine, vertebra.position_mm)).astype(int))
        assert mask[index] == vertebra.label, vertebra.name
    # VerSe voxel coordinates go through the affine: L1's X, Y, Z = 75.1, 35.0, 22.6
    assert np.allclose(vertebrae[0].position_mm, (ct.affine @ [75.1, 35.0, 22.6, 1.0])[:3])


def test_verse004_centroids_land_in_their_mask_label(real_data):
    mask, image = _mask(real_data / VERSE004 / "sub-verse004_seg-vert_msk.nii.gz")
    vertebrae = read_centroids(
        real_data / VERSE004 / "sub-verse004_seg-subreg_ctd.json", image.affine, mask.shape
    )
    assert [vertebra.label for vertebra in vertebrae] == list(range(16, 25))
    for vertebra in vertebrae:
        index = tuple(np.rint(_voxel(image.affine, vertebra.position_mm)).astype(int))
        assert mask[index] == vertebra.label, vertebra.name


def test_mask_centroids_are_centres_of_mass_posterior_of_the_body_centroids(real_data):
    path = real_data / VERSE004 / "sub-verse004_seg-vert_msk.nii.gz"
    mask, image = _mask(path)
    from_mask = load_centroids(path, image.affine, mask.shape)
    from_json = read_centroids(
        real_data / VERSE004 / "sub-verse004_seg-subreg_ctd.json", image.affine, mask.shape
    )
    assert [vertebra.label for vertebra in from_mask] == [vertebra.label for vertebra in from_json]
    for whole, body in zip(from_mask, from_json, strict=True):
        offset = np.subtract(whole.position_mm, body.position_mm)
        assert 5.0 < np.linalg.norm(offset) < 20.0
        assert offset[1] < 0  # whole-vertebra centre of mass lies posterior (smaller RAS y)
    voxel_centre = np.argwhere(mask == 20).mean(axis=0)
    assert np.allclose(_voxel(image.affine, from_mask[4].position_mm), voxel_centre, atol=1e-6)


def test_totalsegmentator_mask_with_body_mask(real_data):
    folder = real_data / "totalsegmentator-example"
    ct = nib.load(str(folder / "example_ct.nii.gz"))
    report = folder / "spine_report" / "example_ct_report"
    whole = load_centroids(report / "totalseg.nii.gz", ct.affine, ct.shape, "totalsegmentator")
    assert [vertebra.name for vertebra in whole] == ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    expected = {"S1": (59, 32, 42), "L5": (59, 38, 51), "L1": (57, 34, 96), "T12": (58, 31, 107)}  # SOURCE.md
    for vertebra in whole:
        if vertebra.name in expected:
            assert np.allclose(_voxel(ct.affine, vertebra.position_mm), expected[vertebra.name], atol=1.5)
    body = load_centroids(
        report / "totalseg.nii.gz",
        ct.affine,
        ct.shape,
        "totalsegmentator",
        body_mask=report / "totalseg_vertebrae_body.nii.gz",
    )
    assert [vertebra.name for vertebra in body] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]  # T11: no body
    by_name = {vertebra.name: vertebra for vertebra in whole}
    for vertebra in body:
        assert vertebra.position_mm[1] > by_name[vertebra.name].position_mm[1]  # bodies are anterior


# ------------------------------------------------------------------------------ writing and reorienting


def test_centroid_round_trip_in_world_mm(real_data, tmp_path):
    ct = nib.load(str(real_data / VERSE014 / "sub-verse014_ct.nii.gz"))
    vertebrae = [
        Vertebra(20 + index, (10.5 * index, -200.25 + index, -80.0 - 30 * index)) for index in range(4)
    ]
    path = tmp_path / "ctd.json"
    write_centroids(path, vertebrae, ct.affine)
    entries = json.loads(path.read_text())
    assert entries[0] == {"direction": ["P", "I", "R"]}
    back = read_centroids(path, ct.affine)
    assert [vertebra.label for vertebra in back] == [20, 21, 22, 23]
    for original, read in zip(vertebrae, back, strict=True):
        assert np.allclose(original.position_mm, read.position_mm, atol=5e-3)
    assert list(tmp_path.iterdir()) == [path]  # atomic: no temporary left behind


def test_centroids_written_in_another_voxel_order_are_reoriented(real_data, tmp_path):
    ct = nib.load(str(real_data / VERSE014 / "sub-verse014_ct.nii.gz"))
    json_path = real_data / VERSE014 / "sub-verse014_seg-vb_ctd.json"
    original = read_centroids(json_path, ct.affine, ct.shape)
    canonical = nib.as_closest_canonical(ct)
    assert axis_codes(canonical.affine) == ("R", "A", "S")
    path = tmp_path / "ras.json"
    write_centroids(path, original, canonical.affine)
    assert json.loads(path.read_text())[0]["direction"] == ["R", "A", "S"]
    # read against the ORIGINAL P,I,R grid: coordinates are permuted/flipped back onto it
    again = read_centroids(path, ct.affine, ct.shape)
    for first, second in zip(original, again, strict=True):
        assert np.allclose(first.position_mm, second.position_mm, atol=5e-3)
    with pytest.raises(InputError, match="shape is needed"):
        read_centroids(path, ct.affine)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('[{"direction": ["P", "I", "R"]}, {"label": 20, ', "not a valid centroid JSON"),
        ('{"label": 20}', "JSON list of objects"),
        ('[{"label": 20, "X": 1, "Y": 2, "Z": 3}]', "direction"),
        ('[{"direction": ["P", "I", "X"]}, {"label": 20, "X": 1, "Y": 2, "Z": 3}]', "axis codes"),
        (
            '[{"direction": ["R", "A", "S"]}, {"label": 99, "X": 1, "Y": 2, "Z": 3}]',
            "unknown vertebra label 99",
        ),
        ('[{"direction": ["R", "A", "S"]}, {"label": 20, "X": 1, "Y": 2}]', "lacks Z"),
        ('[{"direction": ["R", "A", "S"]}, {"label": 20, "X": 1, "Y": "a", "Z": 3}]', "must be numbers"),
        ('[{"direction": ["R", "A", "S"]}, {"label": 20, "X": 1, "Y": 2, "Z": 30}]', "outside the image"),
        (
            '[{"direction": ["R", "A", "S"]}, {"label": 20, "X": 1, "Y": 2, "Z": 3}, {"label": 20, "X": 1, "Y": 2, "Z": 4}]',
            "appears twice",
        ),
    ],
)
def test_bad_centroid_files_give_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "bad_ctd.json"
    path.write_text(content)
    with pytest.raises(InputError) as error:
        read_centroids(path, np.eye(4), (10, 10, 10))
    _single_line_error(error, str(path), fragment)


def test_missing_centroid_file_and_unknown_mask_labels(tmp_path):
    with pytest.raises(InputError) as error:
        load_centroids(tmp_path / "nothing.json", np.eye(4), (5, 5, 5))
    _single_line_error(error, "nothing.json", "not found")
    array = np.zeros((6, 6, 6), dtype=np.int16)
    array[1:3, 1:3, 1:3] = 20
    array[4, 4, 4] = 77
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    with pytest.raises(InputError) as error:
        load_centroids(path, np.eye(4), (6, 6, 6))
    _single_line_error(error, "mask.nii.gz", "unknown vertebra label(s) [77]")
    # the same mask under TotalSegmentator numbering ignores unknown classes; 27 -> L5
    array[array == 20] = 27
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    (vertebra,) = load_centroids(path, np.eye(4), (6, 6, 6), "totalsegmentator")
    assert vertebra.name == "L5" and np.allclose(vertebra.position_mm, (1.5, 1.5, 1.5))
    # a centroid outside the scan is an error for masks too
    with pytest.raises(InputError, match="outside the image"):
        load_centroids(path, np.diag([1, 1, 1, 1.0]) @ _shift(10), (6, 6, 6), "totalsegmentator")


def _shift(offset: float) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    return matrix


def test_centroids_from_mask_volume_object():
    class LabelVolume:
        array = np.zeros((4, 4, 4), dtype=np.float64)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])

    LabelVolume.array[0:2, 0:2, 0:2] = 19.0
    (vertebra,) = centroids_from_mask(LabelVolume())
    assert vertebra.name == "T12" and np.allclose(vertebra.position_mm, (1.0, 1.0, 1.0))
    LabelVolume.array[3, 3, 3] = 0.5
    with pytest.raises(InputError, match="integer labels"):
        centroids_from_mask(LabelVolume(), source="m.nii")


# ----------------------------------------------------------------------------------------------- grades


def test_grades_round_trip_and_names(tmp_path):
    grades = {"b": {20: 3, 8: 0}, "a": {26: 1}}
    path = tmp_path / "grades.csv"
    write_grades(path, grades)
    assert path.read_text().splitlines() == ["case,label,grade", "a,26,1", "b,8,0", "b,20,3"]
    assert read_grades(path) == grades
    path.write_text("case,label,grade\nx,L1,2\nx,T12,0\n")
    assert read_grades(path) == {"x": {20: 2, 19: 0}}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("case,label,grade\nx,20,4\n", "line 2: grade '4' is not a Genant grade 0-3"),
        ("case,label,grade\nx,20,-1\n", "is not a Genant grade"),
        ("case,label,grade\nx,20,1.5\n", "is not a Genant grade"),
        ("case,label,grade\nx,42,1\n", "unknown vertebra label '42'"),
        ("case,label,grade\nx,20,1\nx,L1,0\n", "grades L1 twice"),
        ("case,vertebra,grade\nx,20,1\n", "missing column(s) label"),
    ],
)
def test_bad_grades_give_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "grades.csv"
    path.write_text(content)
    with pytest.raises(InputError) as error:
        read_grades(path)
    _single_line_error(error, str(path), fragment)


def test_verse19_grade_tables(real_data):
    folder = real_data / "verse19-fracture-grades"
    vertebra_data = read_verse19_vertebra_data(folder / "vertebra_data.json")
    assert vertebra_data["sub-verse004"] == {16: 2, 17: 2, 18: 0, 19: 0, 20: 3, 21: 0, 22: 0}
    assert vertebra_data["sub-verse014"] == {20: 0, 21: 0, 22: 0, 23: 0, 24: 0}
    assert sum(len(grades) for grades in vertebra_data.values()) == 1460 and len(vertebra_data) == 153
    counts = np.bincount([grade for grades in vertebra_data.values() for grade in grades.values()])
    assert counts.tolist() == [1172, 141, 96, 51]
    assert len(read_verse19_vertebra_data(folder / "vertebra_data.json", splits=["test"])) == 36
    table = read_verse19_manifest_table(folder / "verse19_manifest.csv")
    assert sum(len(grades) for grades in table.values()) == 1129
    assert table["sub-verse014"] == {20: 0, 21: 0, 22: 0, 23: 0}
    assert table["sub-verse409_split-verse266"][21] == 3
    shared = [(case, label) for case in table if case in vertebra_data for label in table[case]]
    shared = [(case, label) for case, label in shared if label in vertebra_data[case]]
    assert len(shared) == 891 and all(table[c][lab] == vertebra_data[c][lab] for c, lab in shared)
    assert verse19_case_id("sub-verse015", "verse15") == "sub-verse015"
    assert verse19_case_id("sub-verse405", "verse259") == "sub-verse405_split-verse259"


# --------------------------------------------------------------------------------------------- manifests


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_manifest_resolves_relative_paths_by_name_and_reads_grades(tmp_path, monkeypatch):
    root = tmp_path / "download"
    # the download nests files one folder deeper than the manifest says
    _touch(root / "dataset-x" / "dataset-x" / "rawdata" / "sub-a" / "sub-a_ct.nii.gz")
    _touch(root / "dataset-x" / "dataset-x" / "derivatives" / "sub-a" / "sub-a_seg-subreg_ctd.json")
    _touch(root / "scans" / "b_ct.nii.gz")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    manifest = manifests / "set.csv"
    manifest.write_text(
        "case,image,centroids,split\n"
        "sub-a,dataset-x/rawdata/sub-a/sub-a_ct.nii.gz,dataset-x/derivatives/sub-a/sub-a_seg-subreg_ctd.json,train\n"
        "b,scans/b_ct.nii.gz,,test\n"
    )
    (manifests / "set_grades.csv").write_text("case,label,grade\nsub-a,20,3\nsub-a,21,0\n")
    cases = read_manifest(manifest, data_root=root)
    assert [case.case for case in cases] == ["sub-a", "b"]
    assert cases[0].image == (root / "dataset-x/dataset-x/rawdata/sub-a/sub-a_ct.nii.gz").resolve()
    assert cases[0].centroids is not None and cases[0].centroids.name == "sub-a_seg-subreg_ctd.json"
    assert cases[0].grades == {20: 3, 21: 0} and cases[1].grades == {} and cases[1].centroids is None
    # the data root also comes from the environment
    monkeypatch.setenv("VFDETECT_DATA_ROOT", str(root))
    assert read_manifest(manifest)[1].image == (root / "scans/b_ct.nii.gz").resolve()
    # an explicit grades file wins over the one beside the manifest
    # a path missing under the root is also tried beside the manifest
    _touch(manifests / "local_ct.nii.gz")
    (manifests / "local.csv").write_text("case,image,centroids\nc,local_ct.nii.gz,\n")
    assert (
        read_manifest(manifests / "local.csv", data_root=root)[0].image
        == (manifests / "local_ct.nii.gz").resolve()
    )
    other = tmp_path / "other.csv"
    other.write_text("case,label,grade\nb,8,1\n")
    assert read_manifest(manifest, grades=other)[1].grades == {8: 1}


def test_manifest_default_root_is_its_folder_and_write_round_trip(tmp_path, monkeypatch):
    monkeypatch.delenv("VFDETECT_DATA_ROOT", raising=False)
    image = _touch(tmp_path / "data" / "c1_ct.nii.gz")
    centroids = _touch(tmp_path / "data" / "c1_msk.nii.gz")
    cases = [Case("c1", image, centroids, {20: 1}, "totalsegmentator")]
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, cases, tmp_path, grades_path=tmp_path / "grades.csv")
    assert manifest.read_text().splitlines() == [
        "case,image,centroids,label_scheme",
        "c1,data/c1_ct.nii.gz,data/c1_msk.nii.gz,totalsegmentator",
    ]
    (back,) = read_manifest(manifest)
    assert back == Case("c1", image.resolve(), centroids.resolve(), {20: 1}, "totalsegmentator", source="manifest")


def test_manifest_source_and_weight_columns_default_and_round_trip(tmp_path, monkeypatch):
    monkeypatch.delenv("VFDETECT_DATA_ROOT", raising=False)
    _touch(tmp_path / "a.nii.gz")
    _touch(tmp_path / "b.nii.gz")
    plain = tmp_path / "phantoms.csv"
    plain.write_text("case,image,centroids\na,a.nii.gz,\n")
    (case,) = read_manifest(plain)
    assert (case.source, case.weight) == ("phantoms", 1.0)

    mixed = tmp_path / "mixed.csv"
    mixed.write_text("case,image,centroids,source,weight\na,a.nii.gz,,phantom,0.0333\nb,b.nii.gz,,,\n")
    first, second = read_manifest(mixed)
    assert (first.source, first.weight) == ("phantom", 0.0333)
    assert (second.source, second.weight) == ("mixed", 1.0)

    written = tmp_path / "written.csv"
    write_manifest(written, [first, second], tmp_path)
    assert written.read_text().splitlines()[0] == "case,image,centroids,source,weight"
    assert read_manifest(written) == [first, second]
    # Neither column when every case has the defaults.
    write_manifest(written, [Case("a", first.image), Case("b", second.image, source="written")], tmp_path)
    assert written.read_text().splitlines()[0] == "case,image,centroids"


@pytest.mark.parametrize("weight", ["0", "-1", "abc", "nan", "inf"])
def test_manifest_refuses_a_weight_that_is_not_positive(tmp_path, weight):
    _touch(tmp_path / "img.nii.gz")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"case,image,centroids,weight\na,img.nii.gz,,{weight}\n")
    with pytest.raises(InputError) as error:
        read_manifest(manifest, data_root=tmp_path)
    _single_line_error(error, str(manifest), "weight must be a positive number")


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [
        ("a,img.nii.gz,\na,img.nii.gz,\n", "line 3: duplicate case id 'a' (first on line 2)"),
        ("a,missing.nii.gz,\n", "line 2 (case 'a'): image file 'missing.nii.gz' not found"),
        ("a,img.nii.gz,gone_ctd.json\n", "centroids file 'gone_ctd.json' not found"),
        (",img.nii.gz,\n", "empty case id"),
        ("a,img.nii.gz,,weird\n", "unknown label_scheme 'weird'"),
        ("", "lists no cases"),
    ],
)
def test_bad_manifests_give_one_line_errors(tmp_path, rows, fragment):
    _touch(tmp_path / "img.nii.gz")
    manifest = tmp_path / "manifest.csv"
    header = "case,image,centroids,label_scheme\n" if "weird" in rows else "case,image,centroids\n"
    manifest.write_text(header + rows)
    with pytest.raises(InputError) as error:
        read_manifest(manifest, data_root=tmp_path)
    _single_line_error(error, str(manifest), fragment)


def test_bad_grades_beside_a_manifest_name_the_grades_file(tmp_path):
    _touch(tmp_path / "img.nii.gz")
    (tmp_path / "manifest.csv").write_text("case,image,centroids\na,img.nii.gz,\n")
    (tmp_path / "grades.csv").write_text("case,label,grade\na,20,7\n")
    with pytest.raises(InputError) as error:
        read_manifest(tmp_path / "manifest.csv", data_root=tmp_path)
    _single_line_error(error, "grades.csv", "not a Genant grade")


# ------------------------------------------------------------------------------------ committed manifests


def test_committed_verse19_manifest_resolves_in_a_download_tree(tmp_path):
    with (MANIFESTS / "verse19.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len({row["case"] for row in rows}) > 120
    excluded = {"sub-verse008", "sub-verse072", "sub-verse076", "sub-verse133"}
    assert not excluded & {row["case"] for row in rows} and "sub-verse102" in {row["case"] for row in rows}
    # a download tree holding the files, unzipped one folder deeper than the manifest says
    for row in rows:
        for column in ("image", "centroids"):
            _touch(tmp_path / row["split"] / "unzipped" / Path(row[column]).name)
    cases = read_manifest(MANIFESTS / "verse19.csv", data_root=tmp_path)
    grades = read_grades(MANIFESTS / "verse19_grades.csv")
    assert {case.case for case in cases} == set(grades)
    by_case = {case.case: case for case in cases}
    assert by_case["sub-verse004"].grades == {16: 2, 17: 2, 18: 0, 19: 0, 20: 3, 21: 0, 22: 0}
    assert by_case["sub-verse004"].image.name == "sub-verse004_ct.nii.gz"
    assert by_case["sub-verse004"].centroids.name == "sub-verse004_seg-subreg_ctd.json"
    split_case = by_case["sub-verse409_split-verse266"]
    assert split_case.grades[8] == 0 and split_case.grades[24] == 1  # T1 and L5 from vertebra_data.json
    fractured = sum(1 for case in cases for grade in case.grades.values() if grade >= 1)
    assert 250 < fractured < 300


def test_committed_real_manifest(real_data):
    cases = read_manifest(MANIFESTS / "real.csv", data_root=real_data)
    assert [case.case for case in cases] == ["sub-verse014", "totalseg-example_ct"]
    assert cases[0].grades == {20: 0, 21: 0, 22: 0, 23: 0, 24: 0} and cases[1].grades == {}
    ct = nib.load(str(cases[1].image))
    vertebrae = cases[1].vertebrae(ct.affine, ct.shape)
    assert [vertebra.name for vertebra in vertebrae] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    assert all(vertebra.grade is None for vertebra in vertebrae)


def test_manifest_names_are_importable_from_vertebrae_too() -> None:
    from vfdetect import manifest, vertebrae

    for name in manifest.__all__:
        assert getattr(vertebrae, name) is getattr(manifest, name)
    assert vertebrae._FileIndex is manifest.FileIndex
    assert vertebrae._read_csv_rows is manifest.read_csv_rows
    assert vertebrae._resolve_entry is manifest.resolve_entry
    with pytest.raises(AttributeError):
        vertebrae.no_such_name  # noqa: B018
