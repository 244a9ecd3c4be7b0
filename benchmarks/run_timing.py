"""Calibrate `l2l plan` per run from measured runs: run from a workspace whose train stage has run
(its params.yaml, run.yaml, data/prepared and runs/), e.g. after the smoke run:

    PYTHONPATH=. python benchmarks/run_timing.py                  # prints, writes nothing
    PYTHONPATH=. python benchmarks/run_timing.py --write benchmarks/run_timing.json

Fits l2l.timing's model (per run + per epoch + per image + per GFLOP) on the finished runs'
result.json run_seconds, per device; prints the held-out error first (fitted on the even seeds,
predicting the odd ones), then the fit on all of them, which --write records for the device.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2l.config import load_config  # noqa: E402
from l2l.cost import run_costs  # noqa: E402
from l2l.timing import fit_timing, save_timing  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--write", type=Path, help="record the fit in this file (per device)")
    ap.add_argument("--load-average", type=float, help="the machine's load while the runs trained (recorded)")
    args = ap.parse_args(argv)
    config = load_config()
    costs, _ = run_costs(config, None, args.runs)
    measured = [c for c in costs if c.measured_s is not None]
    if not measured:
        sys.exit(f"run_timing: no finished run with run_seconds in {args.runs}")
    for device in sorted({c.device_name for c in measured}):
        mine = [c for c in measured if c.device_name == device]
        even, odd = [c for c in mine if c.spec.seed % 2 == 0], [c for c in mine if c.spec.seed % 2]
        if even and odd:
            held = fit_timing([c.features for c in even], [c.measured_s for c in even], device, "even seeds")
            pred, real = sum(held.seconds(*c.features) for c in odd), sum(c.measured_s for c in odd)
            worst = max(max(held.seconds(*c.features) / c.measured_s, c.measured_s / held.seconds(*c.features))
                        for c in odd)
            print(f"{device}: held out (fit on {len(even)} even-seed runs, predicting {len(odd)} odd-seed runs): "
                  f"predicted {pred:.1f} s, measured {real:.1f} s (x{pred / real:.2f}; worst run x{worst:.2f})")
        timing = fit_timing([c.features for c in mine], [c.measured_s for c in mine], device,
                            f"profile {config.profile.name}, fitted {datetime.date.today()}", args.load_average)
        total = sum(timing.seconds(*c.features) for c in mine)
        print(f"{timing.label}\n  all {len(mine)} runs: predicted {total:.1f} s, measured "
              f"{sum(c.measured_s for c in mine):.1f} s")
        if args.write:
            save_timing(timing, args.write)
            print(f"  written to {args.write}")


if __name__ == "__main__":
    main()
