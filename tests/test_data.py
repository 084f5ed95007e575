"""Datasets: digits, CIFAR-10 pickles, image folders, arrays, latents; the resumable epoch sampler; bad input."""
import pickle

import numpy as np
import pytest
import torch

from imm_fast.config import DataConfig, ModelConfig
from imm_fast.data import (EpochSampler, build_dataset, check_compatible, digits_split, load_digits_arrays)

pytest.importorskip("sklearn")


def test_digits_scale_and_split():
    train_idx, test_idx = digits_split()
    assert len(set(train_idx) & set(test_idx)) == 0 and len(train_idx) + len(test_idx) == 1797
    ds = build_dataset(DataConfig(source="digits", split="all"))
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.num_classes == 10
    x, y = ds.get(np.arange(len(ds)))
    assert 0.45 < x.std().item() < 0.55  # about sigma_d = 0.5
    assert x.min() >= -2 / 3 - 1e-6 and x.max() <= 2 / 3 + 1e-6
    raw, _ = load_digits_arrays("all")
    # to_pixels inverts to_model up to uint8 rounding.
    back = ds.to_pixels(x).float() / 255 * 16
    torch.testing.assert_close(back, torch.from_numpy(raw), atol=16 / 255, rtol=0)
    assert len(build_dataset(DataConfig(source="digits")).labels) == len(train_idx)


def test_sampler_is_resumable_and_covers_each_epoch():
    a = EpochSampler(10, seed=3)
    first = np.concatenate([a.next(4) for _ in range(5)])  # 20 = two epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    b = EpochSampler(10, seed=3)
    b.next(4), b.next(4), b.next(4)
    st = b.state_dict()
    c = EpochSampler(10, seed=3)
    c.load_state_dict(st)
    np.testing.assert_array_equal(np.concatenate([c.next(4), c.next(4)]), first[12:20])
    with pytest.raises(ValueError, match="samples"):
        EpochSampler(11, seed=3).load_state_dict(st)


def _write_cifar(root, n=6):
    root.mkdir()
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.randint(0, 10, n))}
        with open(root / name, "wb") as f:
            pickle.dump(d, f)
    return root


def test_cifar10_pickles(tmp_path):
    root = _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = build_dataset(DataConfig(source="cifar10", path=str(root)))
    assert len(ds) == 30 and ds.shape == (3, 32, 32)
    x, y = ds.get([0, 5])
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and y.shape == (2,)
    with open(root / "data_batch_1", "rb") as f:
        ref = pickle.load(f, encoding="bytes")[b"data"][0].reshape(3, 32, 32)
    torch.testing.assert_close(ds.to_pixels(x[:1])[0], torch.from_numpy(ref))
    assert build_dataset(DataConfig(source="cifar10", path=str(root), class_conditional=False)).labels is None
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        build_dataset(DataConfig(source="cifar10", path=str(root)))


def test_cifar_unpickler_refuses_code(tmp_path):
    root = _write_cifar(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing"):
        build_dataset(DataConfig(source="cifar10", path=str(root), split="test"))


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.RandomState(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    with pytest.raises(ValueError, match="not square"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path / "imgs")))
    ds = build_dataset(DataConfig(source="folder", path=str(tmp_path / "imgs"), resolution=16))
    assert len(ds) == 6 and ds.shape == (3, 16, 16) and ds.num_classes == 2
    assert list(ds.labels) == [0, 0, 0, 1, 1, 1] and ds.class_names == ["cat", "dog"]
    x, _ = ds.get([0, 1], hflip=torch.tensor([True, False]))
    x0, _ = ds.get([0])
    torch.testing.assert_close(x[0], x0[0].flip(-1))


def test_arrays_and_latents(tmp_path):
    rng = np.random.RandomState(0)
    imgs = rng.randint(0, 256, (5, 8, 8, 3), dtype=np.uint8)  # NHWC
    np.savez(tmp_path / "a.npz", x=imgs, y=np.arange(5))
    ds = build_dataset(DataConfig(source="array", path=str(tmp_path / "a.npz")))
    assert ds.shape == (3, 8, 8) and ds.num_classes == 5 and ds.kind == "uint8"
    torch.testing.assert_close(ds.to_pixels(ds.get([2])[0])[0], torch.from_numpy(imgs[2].transpose(2, 0, 1)))
    lat = rng.randn(4, 4, 4, 4).astype(np.float32)
    (tmp_path / "lat").mkdir()
    np.save(tmp_path / "lat" / "latents.npy", lat)
    np.save(tmp_path / "lat" / "labels.npy", np.array([0, 1, 2, 1]))
    ds = build_dataset(DataConfig(source="latents", path=str(tmp_path / "lat")))
    x, y = ds.get([3, 0])
    torch.testing.assert_close(x, torch.from_numpy(lat[[3, 0]]))  # latents are used as stored
    assert y.tolist() == [1, 0]
    np.savez(tmp_path / "bad.npz", images_wrong_key=imgs)
    with pytest.raises(ValueError, match="keys"):
        build_dataset(DataConfig(source="array", path=str(tmp_path / "bad.npz")))
    np.save(tmp_path / "flat.npy", np.zeros((4, 64), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        build_dataset(DataConfig(source="array", path=str(tmp_path / "flat.npy")))


def test_bad_data_config(tmp_path):
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(source="folder")
    with pytest.raises(ValueError, match="source"):
        DataConfig(source="mnist")
    with pytest.raises(FileNotFoundError, match="does not exist|not a folder"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path / "missing")))
    ds = build_dataset(DataConfig(source="digits"))
    with pytest.raises(ValueError, match="img_resolution=8"):
        check_compatible(ds, ModelConfig(img_resolution=16, img_channels=1, label_dim=10, patch_size=2))
    with pytest.raises(ValueError, match="label_dim=10"):
        check_compatible(ds, ModelConfig(img_resolution=8, img_channels=1, label_dim=3, patch_size=2))


def test_one_pixel_decoder_per_data_kind():
    from imm_fast import data as D

    x = torch.tensor([[-2.0, -1.0, -0.5, 0.0, 0.3, 0.6667, 1.0, 3.0]]).reshape(1, 1, 2, 4).double()
    digits = D.to_pixels(x, "digits")
    assert digits.dtype == torch.uint8
    assert torch.equal(digits, ((x.float() * 12 + 8) / 16).clamp(0, 1).mul(255).round().to(torch.uint8))
    assert torch.equal(D.to_pixels(x, "uint8"), ((x.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8))
    ds = build_dataset(DataConfig(source="digits"))
    assert torch.equal(ds.to_pixels(ds.get([0, 1])[0]), D.to_pixels(ds.get([0, 1])[0], "digits"))
    assert D.pixel_kind("digits") == "digits" and D.pixel_kind("cifar10") == D.pixel_kind(None) == "uint8"
    raw = torch.tensor([0.0, 8.0, 16.0])
    assert D.digits_to_model(raw).tolist() == pytest.approx([-2 / 3, 0.0, 2 / 3])
    with pytest.raises(ValueError, match="pixel kind"):
        D.to_pixels(x, "latents")


def _npz_bomb(path, shape, payload=b"\0" * 1000):
    """An .npz whose member declares `shape` float64 but stores a few bytes (what a zip bomb looks like to a
    reader before it inflates)."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", buf.getvalue() + payload)
    return path


def test_npz_headers_are_checked_before_anything_is_inflated(tmp_path):
    import time

    from imm_fast.data import check_npz, load_array
    from imm_fast.errors import DataError

    bomb = _npz_bomb(tmp_path / "bomb.npz", (20000, 20000))
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="zip bomb"):
        load_array(bomb)
    assert time.perf_counter() - t0 < 1.0
    ok = tmp_path / "ok.npz"
    np.savez_compressed(ok, x=np.random.RandomState(0).randint(0, 256, (4, 3, 8, 8), dtype=np.uint8))
    assert check_npz(ok)["x"][:2] == ((4, 3, 8, 8), np.dtype(np.uint8))
    with pytest.raises(DataError, match="more than"):
        check_npz(ok, caps={"x": 100})
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        check_npz(tmp_path / "junk.npz")
