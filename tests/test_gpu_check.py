"""benchmarks/gpu_check.py: it imports and runs where only torch is installed (mlflow and dvc made
unimportable, as on the device machine), and a CPU rehearsal of the whole command at tiny sizes
writes every section's figures in the formats RESULTS.md and `l2l plan` read."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from l2l.cost import load_throughput
from tests.conftest import REPO, write_npz

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
    """The device command at --scale tiny (aot_eager: Inductor takes minutes on 2 cores)."""
    env = torch_only_env(tmp_path)
    src = write_npz(tmp_path / "arrays.npz", n=600)
    assert run_py(["benchmarks/gpu_check.py", "--make-subset", str(tmp_path / "sub.npz"), "--subset-images", "400",
                   "--source", str(src)], env).returncode == 0
    out = tmp_path / "out"
    r = run_py(["benchmarks/gpu_check.py", "--scale", "tiny", "--device", "cpu", "--data", str(tmp_path / "sub.npz"),
                "--out", str(out), "--compile-backend", "aot_eager", "--budget", "3000"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert all(res["sections"][k].startswith("done") for k in
               ("stamp", "methods", "throughput", "stacking", "compile", "concurrency", "slice")), res["sections"]
    m = res["methods"]
    for label in ("conventional", "layerwise", "l2l_alternating", "l2l_mutual", "generations", "distill"):
        assert m[label]["epochs"] >= 1 and 0 <= m[label]["val_acc"] <= 100
    assert m["l2l_alternating"]["updates"] == 2 * m["conventional"]["updates"]  # two updates per batch
    # the CPU promises the same numbers: a resumed run and the same seed twice are bit-identical
    assert m["resume"]["max_param_diff"] == 0
    assert m["same_seed_deterministic_false"]["max_param_diff"] == 0
    compiled = res["compile"]["methods"]["l2l_alternating"]["compiled"]["compile"]
    assert compiled["graphs"] > 0 and compiled["fallbacks_to_eager"] == 0
    assert res["concurrency"] == {"skipped": "needs CUDA (runs share one GPU)"}
    tp = load_throughput(out / "throughput.json")  # the format `l2l plan` reads
    assert tp.device == "cpu" and set(tp.models) == {"cnn", "resnet8"}
    assert all(tp.images_per_s(n) > 0 for n in tp.models)
    # execution modes per family (l2l/modes.py, TEAM.md's contract): separate and stacked_K measured,
    # runs_per_gpu only on CUDA
    modes = tp.modes["resnet8"]
    assert set(modes) == {"separate", "stacked_1", "stacked_2"} and res["stacking"]["runs_per_gpu"].startswith("skipped")
    for name, m in modes.items():
        assert m.images_per_s > 0 and m.achieved_tflops > 0 and m.runs == m.members
    raw = json.loads((out / "throughput.json").read_text())
    (figures,) = raw["measurements"].values()
    assert set(figures["modes"]["resnet8"]["stacked_2"]) == {"images_per_s", "peak_memory_gib", "achieved_tflops",
                                                             "runs"}
    md = (out / "gpu_check.md").read_text()
    assert "| model | batch | engine img/s |" in md and "| l2l_mutual |" in md
    assert "| resnet8 | stacked_2 |" in md or "| resnet8 | stacked_2 (fastest) |" in md
