"""A profile's estimated device-hours per paper, one run at a time and stacked where the method allows:
`l2l plan`'s per-run costs (l2l.cost.run_costs) grouped by the papers whose claims use each run.

    PYTHONPATH=. python benchmarks/plan_by_paper.py --profile paper --device H100

Prints the Markdown table of benchmarks/RESULTS.md ("What the plan and the executor assume until then").
"""
from __future__ import annotations

import argparse
from collections import defaultdict

from l2l.cost import LAUNCH_US, SHARE_OF_PEAK, device_estimate, run_costs
from l2l.selection import load_selection


def by_paper(profile: str, device: str) -> dict[str, list]:
    """paper(s) -> [runs, hours one at a time, hours stacked where the method allows]."""
    config, claims = load_selection(profile=profile, papers="all")
    costs, _ = run_costs(config, None, estimate=device_estimate(device, SHARE_OF_PEAK, LAUNCH_US))
    papers: dict[str, set] = defaultdict(set)
    for c in claims:
        for arm in c.arms:
            papers[arm.experiment].add(c.paper)
    rows: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0])
    for c in costs:
        row = rows[" and ".join(sorted(papers.get(c.spec.experiment, {"no claim"})))]
        row[0] += 1
        row[1] += c.hours
        row[2] += c.stacked[1] if c.stacked else c.hours
    return dict(sorted(rows.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="paper")
    p.add_argument("--device", default="H100", help="a GPU of l2l/devices.py (its data-sheet estimate)")
    args = p.parse_args()
    rows = by_paper(args.profile, args.device)
    print(f"| paper(s) of the runs | runs | {args.device} GPU-hours, one run at a time | stacked where the method "
          "allows | ratio |\n|---|---|---|---|---|")
    for name, (n, one, stacked) in [*rows.items(), ("**total**", [sum(r[i] for r in rows.values()) for i in range(3)])]:
        print(f"| {name} | {n} | {one:.1f} | {stacked:.1f} | x{one / stacked:.2f} |")


if __name__ == "__main__":
    main()
