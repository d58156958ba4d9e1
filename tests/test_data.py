import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import devices
import utils
from conftest import BROKEN_FOLDERS
from utils import CLASSES, UserError


def test_image_folder_loads_in_cifar_class_order(image_folder, tmp_path):
    data = utils.load_cifar10(image_folder, tmp_path / "cache")
    images, labels = data["train"]
    assert images.dtype == torch.uint8 and images.shape == (80, 3, 32, 32)
    assert labels.tolist() == [label for label in range(10) for _ in range(8)]
    assert data["test"][0].shape == (20, 3, 32, 32)
    # Pixels are exactly what was written (PNG is lossless), channels first.
    written = np.array(Image.open(image_folder / "train" / "frog" / "0003.png"))
    assert torch.equal(images[6 * 8 + 3], torch.from_numpy(written).permute(2, 0, 1))


def test_second_load_comes_from_cache_until_files_change(image_folder, tmp_path, monkeypatch):
    first = utils.load_cifar10(image_folder, tmp_path / "cache")

    def no_decoding(split_dir):
        raise AssertionError("decoded again despite the cache")
    monkeypatch.setattr(utils, "_read_image_folder", no_decoding)
    second = utils.load_cifar10(image_folder, tmp_path / "cache")
    assert torch.equal(first["train"][0], second["train"][0])

    monkeypatch.undo()
    Image.new("RGB", (32, 32)).save(image_folder / "train" / "cat" / "extra.png")
    third = utils.load_cifar10(image_folder, tmp_path / "cache")
    assert len(third["train"][1]) == 81


def test_a_file_replaced_under_the_same_name_rebuilds_the_cache(image_folder, tmp_path):
    utils.load_cifar10(image_folder, tmp_path / "cache")
    replaced = image_folder / "test" / "cat" / "0000.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(replaced)  # another size on disk, another time
    test_images, test_labels = utils.load_cifar10(image_folder, tmp_path / "cache")["test"]
    index = (test_labels == utils.CLASSES.index("cat")).nonzero()[0].item()
    assert test_images[index, :, 0, 0].tolist() == [1, 2, 3]


def write_fake_torchvision_files(root):
    """The five training batches, test batch and meta file of cifar-10-python, tiny."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = list(range(10))
        data = rng.integers(0, 256, size=(10, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES)}, f)
    return data  # the test batch's pixels


def test_torchvision_layout_without_network(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10, cifar
    test_pixels = write_fake_torchvision_files(tmp_path)
    # The fake files cannot match torchvision's checksums of the real archive.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)
    monkeypatch.setattr(CIFAR10, "download", lambda self: pytest.fail("tried to download"))
    data = utils.load_cifar10(tmp_path, tmp_path / "cache")
    assert data["train"][0].shape == (50, 3, 32, 32)
    assert data["train"][1].tolist() == list(range(10)) * 5
    assert torch.equal(data["test"][0], torch.from_numpy(test_pixels).view(10, 3, 32, 32))
    assert data["source"].startswith("torchvision")


def test_missing_data_that_cannot_be_downloaded_says_how_to_provide_it(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise OSError("network is unreachable")
    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(UserError, match="download failed.*train/<class>"):
        utils.load_cifar10(tmp_path / "nowhere", tmp_path / "cache")


@pytest.mark.parametrize("broken", BROKEN_FOLDERS)
def test_broken_image_folder_is_a_clear_error(image_folder, tmp_path, broken):
    change, message = BROKEN_FOLDERS[broken]
    change(image_folder)
    with pytest.raises(UserError, match=message):
        utils.load_cifar10(image_folder, tmp_path / "cache")


def test_unreadable_files_are_skipped_with_a_warning(image_folder, tmp_path, capsys):
    (image_folder / "train" / "cat" / "notes.txt").write_text("not an image")
    (image_folder / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    truncated = (image_folder / "train" / "dog" / "0000.png").read_bytes()[:60]
    (image_folder / "train" / "dog" / "0000.png").write_bytes(truncated)
    images, labels = utils.load_cifar10(image_folder, tmp_path / "cache")["train"]
    assert len(labels) == 79 and labels.bincount()[5] == 7
    warning = capsys.readouterr().out
    assert "skipped 2 file(s)" in warning and "notes.txt" in warning and "0000.png" in warning


def test_augmentation_keeps_shapes_and_each_image_with_its_own_content():
    generator = torch.Generator().manual_seed(0)
    # Image i is constant i: translation (reflecting at the border) and flips
    # keep it so, so any mix-up between images would show.
    images = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 3, 32, 32)
    out = utils.augment(images, generator, translate=4, cutout=0)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, images)


def test_augmentation_translates_and_flips_per_image():
    generator = torch.Generator().manual_seed(0)
    image = torch.arange(32 * 32).view(1, 1, 32, 32).expand(200, 3, 32, 32)
    out = utils.augment(image, generator, translate=4, cutout=0)
    padded = torch.nn.functional.pad(image[:1].float(), (4, 4, 4, 4), mode="reflect")[0].long()
    windows = {(dy, dx, flip): padded[:, dy:dy + 32, dx:dx + 32].flip(2) if flip
               else padded[:, dy:dy + 32, dx:dx + 32]
               for dy in range(9) for dx in range(9) for flip in (False, True)}
    found = [next(key for key, w in windows.items() if torch.equal(w, o)) for o in out]
    assert len(set(found)) > 50  # many distinct shifts and flips, each an exact crop
    assert {flip for _, _, flip in found} == {False, True}


def test_cutout_fills_one_square_of_the_given_size_with_the_mean_colour():
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(100, 3, 32, 32, dtype=torch.uint8)
    out = utils.augment(images, generator, translate=0, cutout=8)
    holes = out != 0
    assert holes[:, 0].sum((1, 2)).max() == 64 and holes[:, 0].sum((1, 2)).min() > 0
    assert torch.equal(holes[:, 0], holes[:, 2])  # all channels alike
    assert out[:, :, 0:32, 0:32].amax((0, 2, 3)).tolist() == [125, 123, 114]


def test_normalize_standardizes_to_channels_last_on_the_cpu():
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    x = utils.normalize(images)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert devices.memory_format("cuda") == torch.contiguous_format  # measured faster there
    expected = [(128 / 255 - m) / s for m, s in zip(utils.MEAN, utils.STD)]
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor(expected))
