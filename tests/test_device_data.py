import numpy as np
import torch

from l2l.datasets import DATASETS
from l2l.device_data import DeviceData
from tests.conftest import random_arrays


def _unnormalise(x, dataset="cifar10"):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in DATASETS[dataset].normalization)
    return torch.round((x * std + mean) * 255).to(torch.uint8)


def test_crop_and_flip_semantics():
    arrays = random_arrays(n_train=8)
    data = DeviceData(arrays, "cifar10", torch.device("cpu"), crop_padding=4, flip=True)
    idx = torch.arange(8)
    offsets = torch.tensor([[0, 0], [4, 4], [8, 8], [4, 0], [0, 8], [2, 5], [4, 4], [8, 0]])
    flips = torch.tensor([False, False, False, False, False, False, True, True])
    out = _unnormalise(data.augment(idx, offsets, flips))
    assert out.shape == (8, 3, 32, 32)
    x = torch.from_numpy(arrays["train"][0])
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i, (dy, dx) in enumerate(offsets.tolist()):
        expected = padded[i, :, dy:dy + 32, dx:dx + 32]
        if flips[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected), i
    assert torch.equal(out[1], x[1])  # offset (4, 4) without flip is the original image
    assert (out[0, :, :4, :] == 0).all() and (out[2, :, -4:, :] == 0).all()  # zero padding at the edges


def test_epoch_stream_deterministic_and_distinct():
    data = DeviceData(random_arrays(n_train=64), "cifar10", torch.device("cpu"), crop_padding=4, flip=True)
    a = [torch.cat([x for x, _ in data.train_batches(seed=3, phase=0, epoch=e, batch_size=16)]) for e in (0, 0, 1)]
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a[0], a[2])
    other = torch.cat([x for x, _ in data.train_batches(seed=4, phase=0, epoch=0, batch_size=16)])
    assert not torch.equal(a[0], other)


def test_every_image_once_per_epoch_and_labels_follow():
    arrays = random_arrays(n_train=50)
    arrays["train"] = (arrays["train"][0], np.arange(50) % 10)
    data = DeviceData(arrays, "cifar10", torch.device("cpu"), crop_padding=0, flip=False)
    xs, ys = zip(*data.train_batches(seed=0, phase=0, epoch=0, batch_size=16))
    x, y = _unnormalise(torch.cat(xs)), torch.cat(ys)
    assert len(y) == 50
    src = torch.from_numpy(arrays["train"][0])
    # without augmentation every batch image is exactly one source image, with its label
    for img, label in zip(x, y):
        match = (src == img).flatten(1).all(1).nonzero().flatten()
        assert len(match) == 1 and int(match[0]) % 10 == int(label)


def test_eval_batches_are_unaugmented():
    arrays = random_arrays()
    data = DeviceData(arrays, "cifar10", torch.device("cpu"), crop_padding=4, flip=True)
    x = torch.cat([b for b, _ in data.eval_batches("val", 10)])
    assert torch.equal(_unnormalise(x), torch.from_numpy(arrays["val"][0]))
