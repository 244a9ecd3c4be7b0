"""GPUs by their data sheets: dense peak TFLOP/s per precision, for pricing a device nobody has measured
(``l2l plan --device H100``: l2l.cost.DeviceEstimate) and for the share of peak a measurement reached
(benchmarks/). Dense: without 2:4 sparsity (the data sheets' larger figures). Source: NVIDIA's product
data sheets (H100 / H200: "NVIDIA H100 Tensor Core GPU" and "NVIDIA H200" data sheets, SXM and PCIe/NVL
columns; A100: "NVIDIA A100 Tensor Core GPU" data sheet, 80GB SXM; L40S, L4: their data sheets).
The first entry whose key is part of the device's name wins, so the specific keys come first."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePeaks:
    key: str  # matched against a device name ("NVIDIA H100 80GB HBM3" contains "H100")
    name: str  # as the data sheet names it
    bf16: float  # dense TFLOP/s
    tf32: float
    fp32: float


DEVICES = [
    DevicePeaks("H100 PCIe", "H100 PCIe", 756.0, 378.0, 51.0),
    DevicePeaks("H100 NVL", "H100 NVL", 835.0, 418.0, 60.0),
    DevicePeaks("H100", "H100 SXM", 989.4, 494.7, 66.9),
    DevicePeaks("H200", "H200 SXM", 989.4, 494.7, 66.9),
    DevicePeaks("A100", "A100 SXM", 312.0, 156.0, 19.5),
    DevicePeaks("L40S", "L40S", 362.05, 183.0, 91.6),
    DevicePeaks("L4", "L4", 121.0, 60.0, 30.3),
]


def peaks(device_name: str) -> DevicePeaks | None:
    """The data sheet of the first entry whose key is part of `device_name` (case-insensitive)."""
    return next((d for d in DEVICES if d.key.lower() in device_name.lower()), None)
