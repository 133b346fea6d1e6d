"""trainer.evaluate / trainer.labelled: feature extraction, band selection, the CLI end to end, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from trainer import evaluate, labelled
from trainer.config import tiny
from trainer.model import build_model

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _png_folder(root: Path, n: int = 6, size: int = 40, classes=COLOURS) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, rgb in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            a = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / name / f"{name}_{i}.png")
    return root


def _write_tif(path: Path, a: np.ndarray) -> None:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=a.shape[2], height=a.shape[1], count=a.shape[0],
                       dtype=a.dtype, transform=rasterio.Affine(1, 0, 0, 0, -1, a.shape[1])) as f:
        f.write(a)


def _cli(capsys, *argv):
    rc = evaluate.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny().model)


# ---------------------------------------------------------------------------------------------------------------
# extract_features


def test_extract_features_matches_forward_and_keeps_state(model):
    x = torch.randn(5, 3, 32, 32)
    model.train()
    model.stages[1].eval()  # a mixed-mode module: every submodule's own mode must come back
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    f = evaluate.extract_features(model, x, "hr", batch_size=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    model.eval()
    with torch.no_grad():
        out = model.forward_features(x, "hr")
    np.testing.assert_allclose(f, out["pooled"].numpy(), rtol=1e-5, atol=1e-6)
    g = evaluate.extract_features(model, x.numpy(), "hr", features="all-stages", batch_size=5)
    ref = torch.cat([s.mean(dim=(1, 2)) for s in out["stages"]], dim=1).numpy()
    assert g.shape == (5, sum(model.dims))
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


def test_normalise_and_band_stats():
    rng = np.random.default_rng(0)
    imgs = rng.normal(5.0, 2.0, size=(4, 3, 6, 6)).astype(np.float32)
    imgs[:, 2] = 7.0  # a constant band: std 0 becomes 1
    mean, std = evaluate.band_stats(imgs)
    for c in range(3):
        assert mean[c] == pytest.approx(imgs[:, c].mean(), rel=1e-6)
    assert std[2] == 1.0 and std[0] == pytest.approx(imgs[:, 0].std(), rel=1e-5)
    z = evaluate.normalise(imgs, mean, std)
    np.testing.assert_allclose(z[1, 0, 2, 3], (imgs[1, 0, 2, 3] - mean[0]) / std[0], rtol=1e-5)


def test_check_size_message():
    cfg = tiny().model
    evaluate.check_size(cfg, "hr", 128)
    evaluate.check_size(cfg, "s2", 36)  # S2 keeps its resolution: only the patch size matters
    with pytest.raises(evaluate.EvalError, match="multiple of 32"):
        evaluate.check_size(cfg, "hr", 100)


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_load_png_folder_resize_and_crop(tmp_path):
    root = _png_folder(tmp_path / "imgs", n=2)
    d = labelled.load_folder(root, size=32)
    assert d.modality == "hr" and d.images.shape == (6, 3, 32, 32) and d.images.dtype == np.float32
    assert d.classes == ["blue", "green", "red"] and d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    from PIL import Image

    raw = np.moveaxis(np.asarray(Image.open(d.paths[0])), -1, 0).astype(np.float32)
    c = labelled.load_folder(root, size=32, resize_mode="crop")
    np.testing.assert_array_equal(c.images[0], raw[:, 4:36, 4:36])
    ref = torch.nn.functional.interpolate(torch.from_numpy(raw)[None], size=(32, 32), mode="bilinear",
                                          antialias=True, align_corners=False)[0].numpy()
    np.testing.assert_allclose(d.images[0], ref, rtol=1e-6)


def test_twelve_band_l2a_selects_model_bands(tmp_path):
    a = (np.arange(12, dtype=np.uint16)[:, None, None] * 100 + np.zeros((12, 8, 8), np.uint16))
    for cls in ("a", "b"):
        _write_tif(tmp_path / cls / "x.tif", a)
    d = labelled.load_folder(tmp_path, size=8)
    # L2A order B1..B8, B8A, B9, B11, B12 -> B2..B8, B8A, B11, B12 = positions 1..8, 10, 11.
    assert d.modality == "s2"
    np.testing.assert_array_equal(d.images[0, :, 0, 0], [100 * i for i in (1, 2, 3, 4, 5, 6, 7, 8, 10, 11)])


def test_eurosat_band_selection_real(shared_data):
    import rasterio

    root = shared_data / "eurosat100" / "tif"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    d = labelled.load_folder(root, size=64)
    assert d.modality == "s2" and len(d) == 100 and len(d.classes) == 10
    assert d.source_bands == labelled.S2_LAYOUTS["eurosat13"]
    for i in (0, 37, 99):
        with rasterio.open(d.paths[i]) as f:
            # 1-based: B02..B08 are bands 2-8, B11, B12 are 11, 12; EuroSAT stores B8A last (band 13).
            ref = np.stack([f.read(b) for b in (2, 3, 4, 5, 6, 7, 8, 13, 11, 12)]).astype(np.float32)
        np.testing.assert_array_equal(d.images[i], ref)
    # The evidence for that order: band 10 (0-based 9) is the darkest, i.e. B10 cirrus sits there.
    with rasterio.open(d.paths[0]) as f:
        assert int(np.argmin(f.read().reshape(13, -1).mean(axis=1))) == 9


def test_bigearthnet_multilabel_real(shared_data):
    import rasterio

    root = shared_data / "bigearthnet" / "BigEarthNet-S2-Example"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    d = labelled.load_folder(root, size=120)
    assert d.modality == "s2" and d.multilabel and d.images.shape == (6, 10, 120, 120)
    sample = Path(d.paths[2])
    meta = json.loads(next(sample.glob("*_labels_metadata.json")).read_text())
    assert sorted(d.classes[c] for c in np.flatnonzero(d.labels[2])) == sorted(meta["labels"])
    with rasterio.open(next(sample.glob("*_B02.tif"))) as f:
        np.testing.assert_array_equal(d.images[2, 0], f.read(1).astype(np.float32))
    with rasterio.open(next(sample.glob("*_B8A.tif"))) as f:  # 20 m band, repeated 2x2 onto the 10 m grid
        np.testing.assert_array_equal(d.images[2, 7, ::2, ::2], f.read(1).astype(np.float32))


def test_dataprep_dataset_with_labels(skeleton_dataset):
    from dataprep.reader import DatasetReader

    d = labelled.load_folder(skeleton_dataset, size=64)
    r = DatasetReader(skeleton_dataset)
    with_hr = [i for i in range(len(r)) if r.meta(i)["has_hr"] and r.meta(i)["label"] >= 0]
    assert d.modality == "hr" and len(d) == len(with_hr)
    values = sorted({r.meta(i)["label"] for i in range(len(r)) if r.meta(i)["label"] >= 0})
    assert [d.classes[y] for y in d.labels] == [str(r.meta(i)["label"]) for i in with_hr]
    assert d.classes == [str(v) for v in values]


# ---------------------------------------------------------------------------------------------------------------
# the CLI


def test_cli_synthetic_folder_end_to_end(tmp_path, capsys):
    root = _png_folder(tmp_path / "imgs")
    out = tmp_path / "r.json"
    rc, text, _ = _cli(capsys, "knn", "--features", "histogram", "--data", root, "--split", "0.5", "--json", out)
    assert rc == 0 and "top1" in text
    r = json.loads(out.read_text())
    assert r["metrics"]["top1"] == 100.0  # three solid colours: their histograms are disjoint
    assert (r["n_train"], r["n_val"], r["num_classes"], r["modality"]) == (9, 9, 3, "hr")
    rc, text, _ = _cli(capsys, "linear", "--checkpoint", "random", "--size", "32", "--train", root, "--val", root,
                       "--no-progress", "--json", out)
    r = json.loads(out.read_text())
    assert rc == 0 and r["feature_dim"] == build_model(tiny().model).out_dim
    assert r["backbone"]["source"] == "random" and r["normalisation"] == "train split"
    assert 0.0 <= r["metrics"]["top1"] <= r["metrics"]["top5"] <= 100.0


def test_cli_train_val_class_union(tmp_path, capsys):
    train = _png_folder(tmp_path / "train", n=3, classes={k: COLOURS[k] for k in ("red", "green")})
    val = _png_folder(tmp_path / "val", n=2, classes={k: COLOURS[k] for k in ("red", "blue")})
    out = tmp_path / "r.json"
    rc, _, _ = _cli(capsys, "knn", "--features", "histogram", "--k", "3", "--train", train, "--val", val,
                    "--json", out)
    r = json.loads(out.read_text())
    # Labels follow class names, not folder positions: red is right, blue (unseen in train) can never be.
    assert rc == 0 and r["classes"] == ["green", "red", "blue"] and r["val_only_classes"] == ["blue"]
    assert r["metrics"]["top1"] == 50.0


def test_cli_aid_dev_random_checkpoint(shared_data, tmp_path, capsys):
    root = shared_data / "aid-dev"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    out = tmp_path / "aid.json"
    rc, text, _ = _cli(capsys, "knn", "--checkpoint", "random", "--data", root, "--split", "0.5", "--size", "64",
                       "--no-progress", "--json", out)
    assert rc == 0
    r = json.loads(out.read_text())
    assert (r["n_train"], r["n_val"], r["num_classes"]) == (150, 150, 30)
    assert 100.0 / 30 * 0.5 < r["metrics"]["top1"] <= r["metrics"]["top5"] <= 100.0  # chance is 3.3 %
    assert r["images_per_second"] > 0 and "top1" in text


def test_cli_data_stats(tmp_path, capsys):
    root = _png_folder(tmp_path / "imgs", n=2)
    (tmp_path / "ds").mkdir()
    stats = {"hr": {"mean": [100.0, 100.0, 100.0], "std": [50.0, 50.0, 50.0]}}
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"stats": stats}))
    out = tmp_path / "r.json"
    rc, _, _ = _cli(capsys, "knn", "--checkpoint", "random", "--size", "32", "--data", root, "--data-stats",
                    tmp_path / "ds", "--no-progress", "--json", out)
    assert rc == 0 and json.loads(out.read_text())["normalisation"] == str(tmp_path / "ds")


# ---------------------------------------------------------------------------------------------------------------
# bad input: exit 2 and one line, no traceback


def _bad(capsys, *argv) -> str:
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_bad_missing_path(tmp_path, capsys):
    assert "no such file" in _bad(capsys, "knn", "--features", "histogram", "--data", tmp_path / "nope")


def test_bad_empty_folder(tmp_path, capsys):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert "no images found" in _bad(capsys, "knn", "--features", "histogram", "--data", tmp_path / "empty")


def test_bad_single_class(tmp_path, capsys):
    root = _png_folder(tmp_path / "one", classes={"red": COLOURS["red"]})
    assert "only one class" in _bad(capsys, "knn", "--features", "histogram", "--data", root)


def test_bad_band_count(tmp_path, capsys):
    for cls in ("a", "b"):
        for i in range(2):
            _write_tif(tmp_path / "five" / cls / f"{i}.tif", np.zeros((5, 8, 8), np.uint16))
    assert "5 band(s)" in _bad(capsys, "knn", "--features", "histogram", "--data", tmp_path / "five")
    assert "cannot feed modality 's1'" in _bad(capsys, "knn", "--features", "histogram", "--modality", "s1",
                                               "--data", _png_folder(tmp_path / "rgb", n=2))


def test_bad_size(tmp_path, capsys):
    root = _png_folder(tmp_path / "imgs", n=2)
    assert "multiple of 32" in _bad(capsys, "knn", "--checkpoint", "random", "--size", "48", "--data", root)


def test_bad_checkpoint(tmp_path, capsys):
    root = _png_folder(tmp_path / "imgs", n=2)
    assert "--checkpoint" in _bad(capsys, "knn", "--checkpoint", tmp_path / "no_run", "--size", "32", "--data",
                                  root)


def test_unreadable_image_is_skipped_and_reported(tmp_path, capsys):
    root = _png_folder(tmp_path / "imgs", n=3)
    from PIL import Image

    bad = root / "red" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    gray = root / "blue" / "aaa_gray.png"  # sorts first: an odd band count must not decide the modality
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(gray)
    out = tmp_path / "r.json"
    rc, _, err = _cli(capsys, "knn", "--features", "histogram", "--data", root, "--json", out)
    r = json.loads(out.read_text())
    assert rc == 0 and r["n_skipped"] == 2 and r["modality"] == "hr"
    assert {s["path"] for s in r["skipped"]} == {str(bad), str(gray)}
    assert str(bad) in err and r["n_train"] + r["n_val"] == 9


def test_module_entry_point_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "trainer.evaluate", "knn", "--features", "histogram", "--data",
                        str(tmp_path / "missing")], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error:") and "missing" in p.stderr
