"""FLOPs of a training step as `l2l plan` prices it: grouped convolutions counted correctly
(torch.utils.flop_counter counts their weight gradient `groups` times too high), and a method's
real step (a distilled student's includes its teacher's forward) against hand counts."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from l2l.spec import RunSpec
from l2l.cost import phase_costs, step_factor, train_flops_per_image
from l2l.methods import distill
from l2l.models import build_model
from l2l.profiling import flop_counter, flops
from tests.conftest import TRAIN


@pytest.mark.parametrize("groups", [1, 4, 32])
def test_grouped_convolution_forward_and_backward_hand_count(groups):
    n, c_in, c_out, hw, k = 8, 64, 128, 16, 3
    conv = nn.Conv2d(c_in, c_out, k, padding=1, groups=groups, bias=False).to("meta")
    x = torch.empty(n, c_in, hw, hw, device="meta", requires_grad=True)
    with flop_counter() as counter:
        conv(x).sum().backward()
    macs = n * hw * hw * c_out * (c_in // groups) * k * k  # one forward's multiply-accumulates
    assert counter.get_total_flops() == 3 * 2 * macs  # forward, input gradient, weight gradient
    with FlopCounterMode(display=False) as torch_counter:
        conv(x).sum().backward()
    assert torch_counter.get_total_flops() == 2 * 2 * macs + 2 * macs * groups  # the over-count fixed here


def test_distilled_students_step_adds_the_teachers_forward():
    student_cfg, teacher_cfg = {"arch": "cifar_resnet", "depth": 8, "width": 4}, {"arch": "cifar_resnet", "depth": 14}
    opts = {**distill.validate_options({}, "test"), "teacher_run": {"hash": "t", "model_cfg": teacher_cfg}}
    spec = RunSpec("p5_distill", "distill", "s", "cifar100", 0, student_cfg, {**TRAIN, "epochs": 3}, opts, {})
    student = train_flops_per_image(student_cfg, 100, TRAIN["batch_size"])
    teacher_forward = flops(build_model(teacher_cfg, 100), (3, 32, 32))
    (phase,) = phase_costs(spec)
    assert phase.epochs == 3
    assert phase.step_flops == pytest.approx(student + teacher_forward, rel=1e-9)
    factor, note = step_factor(spec, {})
    assert factor == pytest.approx(1 + teacher_forward / student, rel=1e-9)
    assert "epoch hook skipped" in note  # the teacher's checkpoint is not read at plan time


def test_conventional_step_is_one_conventional_step():
    spec = RunSpec("c", "conventional", "m", "cifar10", 0, {"arch": "cnn", "width": 4}, TRAIN, {}, {})
    assert step_factor(spec, {}) == (pytest.approx(1.0), "")
