"""`python benchmarks/before_after_power.py [replicates]`: before/after power of three claims at the paper profile, planning sd 0.6 per run, normal seeds.
Before: the rule of 1254cba (l2l/stats.py then), 5 seeds, Holm over all 67 claims (first step: p x 67,
others null), BCa bootstrap 999 resamples. Prints the before figures (P(supported) with its Monte Carlo
s.e.); the after figures are `l2l plan`'s power column and benchmarks/calibration.py's table."""
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OLD = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
OLD.write(subprocess.run(["git", "-C", str(REPO), "show", "1254cba:l2l/stats.py"], capture_output=True, text=True,
                         check=True).stdout)
OLD.close()  # the old module is read from git, never from the work tree
spec = importlib.util.spec_from_file_location("old_stats", OLD.name)
old = importlib.util.module_from_spec(spec)
sys.modules["old_stats"] = old
spec.loader.exec_module(old)
R = int(sys.argv[1]) if len(sys.argv) > 1 else 300
rng = np.random.default_rng(0)
sd = 0.6
def arm(x): return dict(enumerate(x))
def old_v(c): return old.verdict(c, alpha=0.05, p_adjusted=None if c.p_value is None else min(1, 67 * c.p_value), min_seeds=2)[0]
res = {}
for name, n_old in (("P1-C1 superiority +0.5", 5), ("P3-C1 reported value, truth = paper", 5), ("P3-C1 reported value, off by 1.0 (tolerance)", 5), ("P5-C1 equivalence, truth equal", 5)):
    hits = []
    for _ in range(R):
        b = rng.normal(90, sd, n_old)
        if name.startswith("P1"):
            c = old.compare_superiority(arm(rng.normal(90.5, sd, n_old)), arm(b), effect_of_interest=0.5,
                                        n_resamples=999)
        elif name.startswith("P5"):
            c = old.compare_equivalence(arm(rng.normal(90, sd, n_old)), arm(rng.normal(90, sd, n_old)), margin=1.0, n_resamples=999)
        else:
            off = 1.0 if "off" in name else 0.0
            c = old.compare_reported(arm(rng.normal(88.3 + off, sd, n_old)), 88.3, n_resamples=999)
        hits.append(old_v(c) == "supported")
    p = np.mean(hits); res[name] = (p, np.sqrt(p * (1 - p) / R))
for k, (p, se) in res.items():
    print(f"before | {k} | {100*p:.1f} ± {100*se:.1f}%")
Path(OLD.name).unlink()
