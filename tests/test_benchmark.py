"""The throughput benchmark runs (a functional check, never a timing assertion): its naive
reference sees the same images as the engine, and its figures land in the table and the JSON
that `l2l plan` reads."""
import importlib.util
import json

import numpy as np
import torch
from torchvision import transforms as T

from l2l.cost import load_throughput
from l2l.datasets import DATASETS
from l2l.device_data import DeviceData
from tests.conftest import REPO, write_npz

spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks/throughput.py")
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)


def test_naive_dataset_holds_the_engines_images():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8), np.arange(8) % 10
    ds = throughput.naive_dataset(x, y, None)
    assert type(ds).__name__ == "CIFAR10" and len(ds) == 8
    ds.transform = T.Compose([T.ToTensor(), T.Normalize(*DATASETS["cifar10"].normalization)])  # no augmentation
    engine = DeviceData({"train": (x, y)}, "cifar10", torch.device("cpu"), crop_padding=4, flip=True).normalise(torch.from_numpy(x))
    for i in range(8):
        img, label = ds[i]
        assert label == y[i] and torch.allclose(img, engine[i], atol=1e-5)
    ds.transform = throughput.naive_dataset(x, y, None).transform
    assert ds[0][0].shape == (3, 32, 32)  # the augmented path runs


def test_quick_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    result = throughput.main(["--device", "cpu", "--models", "resnet20", "--images", "64", "--batch-size", "32",
                              "--warmup", "1", "--steps", "1", "--naive-workers", "0",
                              "--npz", str(write_npz(tmp_path / "a.npz", n=100)), "--json", str(out)])
    row = result["models"]["resnet20"]
    assert row["engine_images_per_s"] > 0 and row["naive_images_per_s"] > 0 and row["share_of_bf16_peak"] is None
    assert row["ratio"] == row["engine_images_per_s"] / row["naive_images_per_s"]
    table = capsys.readouterr().out
    assert "| resnet20 | cpu | 32 |" in table and result["stamp"]["device_name"] in table.splitlines()[0]
    stored = load_throughput(out)
    assert stored.device == "cpu" and stored.models["resnet20"]["cfg"] == {"arch": "cifar_resnet", "depth": 20}
    assert json.loads(out.read_text())["measurements"][stored.device_name]["images"] == 64
