"""benchmarks/gpu_check.py: it imports and runs where only torch is installed (mlflow and dvc made
unimportable, as on the device machine), and a CPU rehearsal of the whole command at tiny sizes
writes every section's figures in the formats RESULTS.md and `l2l plan` read."""
import importlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
from scipy.stats import binomtest

from l2l.config import load_config
from l2l.cost import load_throughput
from tests.conftest import REPO, real_npz, write_npz

BLOCKER = textwrap.dedent('''
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("mlflow", "dvc"):
                raise ImportError(f"{name} is not installed here (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
''')


def torch_only_env(tmp_path) -> dict:
    """PYTHONPATH with a sitecustomize that makes mlflow and dvc unimportable, then the checkout."""
    (tmp_path / "blocker").mkdir(exist_ok=True)
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": f"{tmp_path / 'blocker'}{os.pathsep}{REPO}"}


def run_py(args, env, cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_engine_methods_plan_and_benchmarks_import_without_mlflow_and_dvc(tmp_path):
    env = torch_only_env(tmp_path)
    code = textwrap.dedent('''
        import sys
        try:
            import mlflow
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not block mlflow")
        sys.path.insert(0, "benchmarks")
        import l2l.engine, l2l.methods, l2l.cost, l2l.cli, l2l.executor, throughput, gpu_check
        from l2l.methods import METHODS
        assert set(METHODS) == {"conventional", "l2l", "layerwise", "generations", "distill"}
        bad = [m for m in sys.modules if m.split(".")[0] in ("mlflow", "dvc")]
        assert not bad, bad
        print("imports ok")
    ''')
    r = run_py(["-c", code], env)
    assert r.returncode == 0 and "imports ok" in r.stdout, r.stderr
    r = run_py(["benchmarks/gpu_check.py", "--help"], env)
    assert r.returncode == 0, r.stderr
    for word in ("--budget", "--out", "--make-subset", "stamp", "concurrency", "slice"):
        assert word in r.stdout


def test_make_subset_is_stratified(tmp_path):
    src = write_npz(tmp_path / "arrays.npz", n=600)
    r = run_py(["benchmarks/gpu_check.py", "--make-subset", str(tmp_path / "sub.npz"), "--subset-images", "400",
                "--source", str(src)], os.environ)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "sub.npz") as z:
        x, y = z["x_train"], z["y_train"]
    assert x.shape == (400, 3, 32, 32) and x.dtype == np.uint8
    assert np.bincount(y, minlength=10).tolist() == [40] * 10
    assert not (tmp_path / "sub.npz.tmp.npz").exists()


def test_cpu_rehearsal_of_the_gpu_check(tmp_path):
    """The device command at --scale tiny (aot_eager: Inductor takes minutes on 2 cores), on a subset of the
    real offline arrays, every run through the CUDA branches: each method learns above chance."""
    env = torch_only_env(tmp_path)
    assert run_py(["benchmarks/gpu_check.py", "--make-subset", str(tmp_path / "sub.npz"), "--subset-images", "1010",
                   "--source", str(real_npz())], env).returncode == 0
    out = tmp_path / "out"
    r = run_py(["benchmarks/gpu_check.py", "--scale", "tiny", "--device", "cpu", "--data", str(tmp_path / "sub.npz"),
                "--out", str(out), "--compile-backend", "aot_eager", "--budget", "3000"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert all(res["sections"][k].startswith("done") for k in
               ("stamp", "latency", "methods", "throughput", "stacking", "cuda_graphs", "tf32", "compile",
                "concurrency", "slice")), res["sections"]
    lat = res["latency"]  # P5's planned students against the teacher: on a CPU, eager only (no CUDA graphs)
    assert list(lat["modes"]) == ["eager"] and list(lat["modes"]["eager"]) == ["b1", "b8"]
    assert lat["teacher"] == "p5_teacher" and set(lat["models"]) == {"p5_teacher", "p5_resnet20", "p5_wide_resnet20",
                                                                      "p5_narrow_deep"}
    for b in ("b1", "b8"):
        rows = lat["modes"]["eager"][b]
        assert rows["p5_teacher"]["ratio"] == 1.0 and all(r["median_ms"] > 0 for r in rows.values())
    nd = lat["models"]["p5_narrow_deep"]
    assert nd["flops_ratio"] < 0.5 < nd["leaf_module_ratio"]  # the smoke stand-ins: cheaper in FLOPs, deeper
    m = res["methods"]
    val = 300  # the tiny scale's validation images: a predictor that ignores the image gets chance_val_acc at most
    for label in ("conventional", "layerwise", "l2l_alternating", "l2l_mutual", "generations", "distill"):
        correct = round(m[label]["val_acc"] * val / 100)
        p = binomtest(correct, val, m["chance_val_acc"] / 100, alternative="greater").pvalue
        assert p < 0.01, (label, m[label])
    assert m["l2l_alternating"]["updates"] == 2 * m["conventional"]["updates"]  # two updates per batch
    # the CPU promises the same numbers: a resumed run and the same seed twice are bit-identical
    assert m["resume"]["max_param_diff"] == 0
    assert m["same_seed_deterministic_false"]["max_param_diff"] == 0
    compiled = res["compile"]["methods"]["l2l_alternating"]["compiled"]["compile"]
    assert compiled["graphs"] > 0 and compiled["fallbacks_to_eager"] == 0
    assert res["concurrency"] == {"skipped": "needs CUDA (runs share one GPU)"}
    graphs = res["cuda_graphs"]  # l2l.graphs.Rehearsal on a CPU: the replay bookkeeping, exact
    assert graphs["models"]["resnet8"]["max_param_diff"] == 0 and graphs["models"]["resnet8"]["graphs"]["used"]
    for label, r in graphs["methods"].items():
        assert r["max_param_diff"] == 0 and r["graphs"]["replayed_steps"] > 0, label
    assert set(res["tf32"]) == {"p3_k2_narrow"} and res["tf32"]["p3_k2_narrow"]["max_rel_logit_diff"] == 0  # CPU
    tp = load_throughput(out / "throughput.json")  # the format `l2l plan` reads
    assert tp.device == "cpu" and set(tp.models) == {"cnn", "resnet8"}
    doc = json.loads((out / "throughput.json").read_text())
    assert not any("cuda_graphs" in m for m in doc["measurements"][tp.device_name]["modes"].values())  # none from a CPU
    assert all(tp.images_per_s(n) > 0 for n in tp.models)
    # execution modes per family (l2l/modes.py's format): separate and stacked_K measured,
    # runs_per_gpu only on CUDA
    modes = tp.modes["resnet8"]
    assert set(modes) == {"separate", "stacked_1", "stacked_2"} and res["stacking"]["runs_per_gpu"].startswith("skipped")
    for name, m in modes.items():
        assert m.images_per_s > 0 and m.achieved_tflops > 0
    raw = json.loads((out / "throughput.json").read_text())
    (figures,) = raw["measurements"].values()
    # the runs in flight each measurement trained: the stack's members (1 process)
    runs = {n: f["runs"] for n, f in figures["modes"]["resnet8"].items()}
    assert runs == {"separate": 1, "stacked_1": 1, "stacked_2": 2}
    assert set(figures["modes"]["resnet8"]["stacked_2"]) == {"images_per_s", "peak_memory_gib", "achieved_tflops",
                                                             "runs"}
    md = (out / "gpu_check.md").read_text()
    assert "| model | batch | engine img/s |" in md and "| l2l_mutual |" in md
    assert "| resnet8 (resnet8) | 32 |" in md and "| p3_k2_narrow | 32 |" in md
    assert "| p5_narrow_deep |" in md and "eager b1 ms (ratio)" in md
    assert "| resnet8 | stacked_2 |" in md or "| resnet8 | stacked_2 (fastest) |" in md


def test_the_cuda_graphs_mode_reaches_throughput_json_per_profile_model_name(monkeypatch):
    """l2l/modes.py's format: measurements[<device>]["modes"][<profile model name>]["cuda_graphs"] = {images_per_s,
    peak_memory_gib, achieved_tflops, runs}; one measurement per distinct configuration, written under every
    name of the paper profile that has it; nothing from a CPU."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")

    families = gpu_check.graph_families(gpu_check.paper_models())
    names = {n for f in families.values() for n in f["names"]}
    assert {"p4_resnet", "p5_teacher", "p5_resnet20", "p5_wide_resnet20", "p5_narrow_deep"} <= names
    assert ["p4_resnet", "p5_teacher"] in [f["names"] for f in families.values()]  # both ResNet-110: measured once
    row = {"names": ["p4_resnet", "p5_teacher"], "graphs_images_per_s": 9000.0, "graphs_peak_memory_gib": 1.5,
           "graphs_achieved_tflops": 13.7, "graphs": {"used": True}}
    results = {"stamp": {"device": "cuda"}, "cuda_graphs": {"models": {"p4_resnet": row,
                                                                      "p5_resnet20": {"names": ["p5_resnet20"],
                                                                                      "skipped": "budget"}}}}
    mode = {"images_per_s": 9000.0, "peak_memory_gib": 1.5, "achieved_tflops": 13.7, "runs": 1}
    assert gpu_check.cuda_graphs_modes(results) == {"p4_resnet": {"cuda_graphs": mode},
                                                     "p5_teacher": {"cuda_graphs": mode}}
    assert gpu_check.cuda_graphs_modes({**results, "stamp": {"device": "cpu"}}) == {}
    merged = gpu_check.merge_modes({"a": {"separate": 1}}, {"a": {"cuda_graphs": 2}})
    assert merged == {"a": {"separate": 1, "cuda_graphs": 2}}
    p3 = {k: v for k, v in gpu_check.paper_models().items() if k in gpu_check.P3_FP32}
    assert set(p3) == set(gpu_check.P3_FP32)  # the tf32 section's networks exist in the profile


def test_latency_section_models_are_the_planned_ones(monkeypatch):
    """The P5 models the latency section times are params.yaml's (paper sizes; the tiny scale: the smoke
    profile's), the teacher first."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")

    for profile, models in (("paper", gpu_check.P5_MODELS), ("smoke", gpu_check.TINY_P5_MODELS)):
        planned = load_config(REPO / "params.yaml", profile).profile.models
        assert list(models)[0] == "p5_teacher"
        for name, cfg in models.items():
            assert {k: planned[name][k] for k in cfg} == cfg, (profile, name)
