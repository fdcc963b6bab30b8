"""The synthetic dataset must look, on disk, exactly like the official Oxford-IIIT Pet layout."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from labseg.synthetic import BREEDS, STAMP_NAME, default_sample_dir, write_synthetic_dataset

SMALL = dict(n_trainval_per_breed=4, n_test_per_breed=2, image_size=(96, 72))


def entries(path):
    """Split-file entries, skipping the '#' header lines."""
    return [line.split() for line in path.read_text().splitlines() if line and not line.startswith("#")]


def header(path):
    """(format, mode, size) of an image file, closing it again."""
    with Image.open(path) as image:
        return image.format, image.mode, image.size


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("pets") / "ds", seed=0, **SMALL)


def test_layout_and_line_counts(dataset):
    ann = dataset / "annotations"
    assert (dataset / "images").is_dir() and (ann / "trimaps").is_dir()
    trainval, test = entries(ann / "trainval.txt"), entries(ann / "test.txt")
    listed = entries(ann / "list.txt")
    assert len(trainval) == 4 * len(BREEDS) and len(test) == 2 * len(BREEDS)
    assert sorted(map(tuple, listed)) == sorted(map(tuple, trainval + test))
    assert not {e[0] for e in trainval} & {e[0] for e in test}
    assert (ann / "list.txt").read_text().startswith("#Image CLASS-ID SPECIES BREED ID\n")
    assert len(list((dataset / "images").glob("*.jpg"))) == 6 * len(BREEDS)
    assert json.loads((dataset / STAMP_NAME).read_text())["complete"] is True


def test_ids_follow_the_official_conventions(dataset):
    seen = {}
    for name, class_id, species, breed_id in entries(dataset / "annotations" / "list.txt"):
        breed = name.rsplit("_", 1)[0]  # breed names may contain "_": split at the last one
        seen.setdefault(breed, set()).add((int(class_id), int(species), int(breed_id)))
        assert (species == "1") == breed[0].isupper()  # cats Capitalised, dogs lower case
    assert all(len(ids) == 1 for ids in seen.values())  # one id triple per breed
    ids = {breed: next(iter(v)) for breed, v in seen.items()}
    assert sorted(c for c, _, _ in ids.values()) == list(range(1, len(BREEDS) + 1))
    assert [ids[b][0] for b in sorted(ids, key=str.lower)] == list(range(1, len(BREEDS) + 1))
    for species in (1, 2):
        breed_ids = sorted(b for _, s, b in ids.values() if s == species)
        assert breed_ids == list(range(1, len(breed_ids) + 1))
    assert {s for _, s, _ in ids.values()} == {1, 2} and "spot_dog" in ids


def test_every_entry_has_an_image_and_a_matching_trimap(dataset):
    for name, *_ in entries(dataset / "annotations" / "list.txt"):
        image_format, _, image_size = header(dataset / "images" / f"{name}.jpg")
        trimap = dataset / "annotations" / "trimaps" / f"{name}.png"
        assert image_format == "JPEG" and header(trimap)[:2] == ("PNG", "L")
        assert image_size == header(trimap)[2]
        values = pixels(trimap)
        assert set(np.unique(values).tolist()) <= {1, 2, 3}
        assert (values == 1).any() and (values == 3).any() and (values == 2).any()
        assert 0.1 < (values != 2).mean() < 0.75  # the pet covers roughly 15-60% of the image


def test_border_band_straddles_the_outline(dataset):
    name = entries(dataset / "annotations" / "trainval.txt")[0][0]
    values = pixels(dataset / "annotations" / "trimaps" / f"{name}.png")
    # Pet and background never touch directly: the band (3) always lies between them.
    for a, b in ((values[:, 1:], values[:, :-1]), (values[1:], values[:-1])):
        assert not ((a == 1) & (b == 2)).any() and not ((a == 2) & (b == 1)).any()


def test_image_sizes_vary_around_the_nominal_size(dataset):
    sizes = {header(p)[2] for p in (dataset / "images").glob("*.jpg")}
    assert len(sizes) > 5
    assert all(0.74 * 96 <= w <= 1.26 * 96 and 0.74 * 72 <= h <= 1.26 * 72 for w, h in sizes)


def test_grayscale_and_cmyk_quirks_are_in_trainval(dataset):
    trainval = {e[0] for e in entries(dataset / "annotations" / "trainval.txt")}
    modes = {p.stem: header(p)[1] for p in (dataset / "images").glob("*.jpg")}
    odd = {name: mode for name, mode in modes.items() if mode != "RGB"}
    assert sorted(odd.values()) == ["CMYK", "L"]
    assert set(odd) <= trainval


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    again = write_synthetic_dataset(tmp_path / "again", seed=0, **SMALL)
    other = write_synthetic_dataset(tmp_path / "other", seed=1, **SMALL)
    for split in ("list.txt", "trainval.txt", "test.txt"):
        assert (again / "annotations" / split).read_text() == (dataset / "annotations" / split).read_text()
    trimaps = sorted(p.name for p in (dataset / "annotations" / "trimaps").iterdir())
    for name in trimaps:
        assert (again / "annotations" / "trimaps" / name).read_bytes() == \
               (dataset / "annotations" / "trimaps" / name).read_bytes()
    differing = [name for name in trimaps if (other / "annotations" / "trimaps" / name).read_bytes()
                 != (dataset / "annotations" / "trimaps" / name).read_bytes()]
    assert len(differing) == len(trimaps)


def test_second_call_keeps_the_files_and_changed_parameters_rewrite(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", seed=3, **SMALL)
    image = next((root / "images").glob("*.jpg"))
    before = image.stat().st_mtime_ns
    assert write_synthetic_dataset(tmp_path / "ds", seed=3, **SMALL) == root
    assert image.stat().st_mtime_ns == before
    write_synthetic_dataset(tmp_path / "ds", seed=3, overwrite=True, **SMALL)
    assert image.stat().st_mtime_ns != before
    # Fewer images requested: the old, larger dataset is replaced, not mixed in.
    write_synthetic_dataset(tmp_path / "ds", seed=3, n_trainval_per_breed=2, n_test_per_breed=1,
                            image_size=(96, 72))
    assert len(list((root / "images").glob("*.jpg"))) == 3 * len(BREEDS)
    assert json.loads((root / STAMP_NAME).read_text())["params"]["n_trainval_per_breed"] == 2


def test_interrupted_generation_is_not_taken_as_complete(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", seed=0, **SMALL)
    stamp = json.loads((root / STAMP_NAME).read_text())
    (root / STAMP_NAME).write_text(json.dumps({**stamp, "complete": False}))  # as if cut off mid-way
    victim = next((root / "annotations" / "trimaps").glob("*.png"))
    victim.unlink()
    write_synthetic_dataset(root, seed=0, **SMALL)
    assert victim.exists()
    assert json.loads((root / STAMP_NAME).read_text())["complete"] is True


def test_refuses_to_write_into_a_foreign_dataset(tmp_path):
    (tmp_path / "real" / "images").mkdir(parents=True)
    (tmp_path / "real" / "images" / "Abyssinian_1.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(tmp_path / "real", **SMALL)
    assert (tmp_path / "real" / "images" / "Abyssinian_1.jpg").read_bytes() == b"not ours"


def test_default_sample_dir_is_under_the_project_root():
    import labseg.synthetic as synthetic
    from pathlib import Path

    package_dir = Path(synthetic.__file__).resolve().parent
    assert default_sample_dir() == package_dir.parent / "data" / "sample"


def test_ensure_sample_uses_the_defaults(tmp_path):
    from labseg.synthetic import ensure_sample

    root = ensure_sample(tmp_path / "sample")
    assert len(entries(root / "annotations" / "trainval.txt")) == 12 * len(BREEDS)
    assert len(entries(root / "annotations" / "test.txt")) == 6 * len(BREEDS)


@pytest.mark.parametrize("kwargs,message", [({"seed": -1}, "seed=-1: expected an integer >= 0"),
                                            ({"image_size": (8, 6)}, "image_size=(8, 6): expected (width, height)")])
def test_bad_parameters_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    """A negative seed failed half-way (numpy), leaving a stamped, incomplete folder; 8×6 px
    crashed on an empty pet. Both now stop before the folder is made."""
    with pytest.raises(ValueError, match=re.escape(message)):
        write_synthetic_dataset(tmp_path / "sample", **kwargs)
    assert not (tmp_path / "sample").exists()


@pytest.mark.parametrize("before", ["nothing", "an older sample"])
def test_two_writers_at_once_both_finish_and_leave_one_whole_dataset(tmp_path, monkeypatch, before):
    """Two `labseg prepare` (or two notebooks' ensure_sample) at once: one's rmtree removed the
    other's files and its mkdir then raised FileExistsError. Each now builds in a folder of its own
    and renames it into place; here the second writer runs whole while the first starts its images."""
    from pathlib import Path

    root = tmp_path / "sample"
    if before == "an older sample":
        write_synthetic_dataset(root, seed=1, **SMALL)
        (root / "README.md").write_text("mine")             # a file of the folder's own stays
    real_mkdir = Path.mkdir
    other = []

    def interleaved(self, *args, **kwargs):
        if self.name == "images" and not other:
            other.append("running")
            other[0] = write_synthetic_dataset(root, seed=0, **SMALL)       # the other process, start to end
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", interleaved)
    assert write_synthetic_dataset(root, seed=0, **SMALL) == root and other == [root]
    monkeypatch.undo()
    assert json.loads((root / STAMP_NAME).read_text())["complete"] is True
    names = [e[0] for e in entries(root / "annotations" / "list.txt")]
    assert len(names) == 6 * len(BREEDS)
    assert sorted(p.stem for p in (root / "images").iterdir()) == sorted(names)
    assert sorted(p.stem for p in (root / "annotations" / "trimaps").iterdir()) == sorted(names)
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]          # no temporary folder left
    assert not list(root.glob(".*.tmp"))
    if before == "an older sample":
        assert (root / "README.md").read_text() == "mine"


def test_a_linked_sample_is_rewritten_where_the_link_points_and_a_file_is_refused(tmp_path):
    """data/sample may be a link to a shared copy: rewriting it once replaced the link by a local
    folder, left the link beside it and moved the shared folder's own files out of it."""
    shared = tmp_path / "shared" / "sample"
    write_synthetic_dataset(shared, seed=1, **SMALL)
    (shared / "NOTES.txt").write_text("the course's")
    link = tmp_path / "data" / "sample"
    link.parent.mkdir()
    link.symlink_to(shared)
    write_synthetic_dataset(link, seed=0, overwrite=True, **SMALL)
    assert link.is_symlink() and [p.name for p in link.parent.iterdir()] == ["sample"]
    assert json.loads((shared / STAMP_NAME).read_text())["params"]["seed"] == 0
    assert (shared / "NOTES.txt").read_text() == "the course's"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'afile'} is a file; expected a folder")):
        write_synthetic_dataset(tmp_path / "afile", **SMALL)
