"""Datasets for ``flashkat train`` and ``flashkat validate``.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download),
  split once into 1,437 training and 360 held-out images (stratified, fixed seed).
* ``synthetic``: fixed random images generated on the fly from their index (any size, any number of
  classes): for throughput runs and tests without data.
* a directory: an ImageFolder tree in ImageNet's layout, ``ROOT/train/<class>/*`` and
  ``ROOT/val/<class>/*`` (or ``validation/``).

Every image comes out as a normalised float tensor of the model's input size ``(C, H, W)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

__all__ = ["NAMED_DATASETS", "DatasetError", "digits", "SyntheticImages", "image_folder", "describe"]

NAMED_DATASETS = ("digits", "synthetic")
DIGITS_HELD_OUT = 360  # 20% of sklearn's 1,797 digits
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760  # of the pixels scaled to [0, 1]


class DatasetError(ValueError):
    """A dataset that is missing, malformed or incompatible with the request (a clear user error)."""


def _resize(images: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """[N, c, h, w] -> [N, C, H, W]: bilinear resize and channel replication as needed."""
    channels, height, width = input_size
    if images.shape[-2:] != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    if images.shape[1] != channels:
        if images.shape[1] != 1:
            raise DatasetError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
        images = images.expand(-1, channels, -1, -1)
    return images.contiguous()


def digits(split: str, input_size: Sequence[int] = (1, 8, 8)) -> TensorDataset:
    """sklearn's digits, ``split`` "train" (1,437 images) or "val" (360 held out), as a TensorDataset.

    Pixels (0..16) are scaled to [0, 1] and normalised with the dataset's mean and std; images are
    resized / replicated to ``input_size`` when a model wants something other than 1x8x8.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train_idx, val_idx = train_test_split(
        range(len(data.target)), test_size=DIGITS_HELD_OUT, stratify=data.target, random_state=0
    )
    index = {"train": train_idx, "val": val_idx}[split]
    images = torch.tensor(data.images[index], dtype=torch.float32).unsqueeze(1) / 16.0
    images = _resize((images - DIGITS_MEAN) / DIGITS_STD, input_size)
    return TensorDataset(images, torch.tensor(data.target[index], dtype=torch.int64))


class SyntheticImages(Dataset):
    """``size`` fixed random images of shape ``input_size`` with random labels, made from their index.

    Image i is a coarse 4x4 pattern of its class (upsampled) plus Gaussian noise, so the loss has
    something to learn; the same (seed, split, i) always gives the same image, in any process.
    Train and val splits draw different images and labels from the same class patterns.
    """

    def __init__(self, size: int, num_classes: int, input_size: Sequence[int], seed: int = 0, split: str = "train"):
        self.size, self.num_classes, self.input_size = size, num_classes, tuple(input_size)
        self.seed = seed * 2 + (split != "train")
        generator = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, self.input_size[0], 4, 4, generator=generator)
        self.labels = torch.randint(num_classes, (size,), generator=torch.Generator().manual_seed(self.seed))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(self.labels[index])
        pattern = F.interpolate(self.patterns[label][None], size=self.input_size[1:], mode="nearest")[0]
        return pattern + torch.randn(self.input_size, generator=generator), label


def _split_dir(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"dataset folder {root} has no {' or '.join(n + '/' for n in names)} sub-folder (expected "
                       f"ImageNet's layout: {root}/train/<class>/<image>, {root}/val/<class>/<image>)")


def image_folder(root: str | os.PathLike, split: str, transform: Callable | None = None):
    """torchvision's ImageFolder on ``root/train`` or ``root/val`` (``validation``), checked up front.

    Raises ``DatasetError`` for a missing folder, a split without images, or a first image that cannot
    be decoded, so a bad path fails before any training.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} does not exist or is not a directory "
                           f"(use 'digits', 'synthetic' or an ImageFolder root with train/ and val/)")  # fmt: skip
    folder = _split_dir(root, ("train",) if split == "train" else ("val", "validation"))
    try:
        dataset = ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:  # no class folders / no images
        raise DatasetError(f"dataset folder {folder} is not usable: {error}") from error
    try:
        dataset[0]
    except Exception as error:  # noqa: BLE001 - any decoding failure is a dataset problem
        raise DatasetError(f"cannot read {dataset.samples[0][0]}: {error}") from error
    return dataset


def describe(name_or_path: str) -> str:
    """A short name for a dataset argument, for output folder names."""
    return name_or_path if name_or_path in NAMED_DATASETS else Path(name_or_path).resolve().name
