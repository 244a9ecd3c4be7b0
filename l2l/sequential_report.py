"""The report's sections on the sequential design (l2l.stats.Design): the measured error rates of the
whole procedure (benchmarks/calibration.json, written by benchmarks/calibration.py), and per claim the
looks it took, why it stopped or goes on, and the device-hours of the runs behind its verdict
(results/runs.csv `train_seconds`, measured)."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from l2l.io import read_json
from l2l.report import Doc

CALIBRATION_FILE = Path("benchmarks/calibration.json")


def _g(x, spec: str = ".2g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def decision_text(c: dict, shown: str) -> str:
    """The verdict table's decision interval: `shown` (the estimate's, rounded on its scale) with each
    bound's one-sided level, or the interval of the other quantity that decided (e.g. a gain)."""
    d = c.get("decision")
    if not d:
        return shown
    if d.get("shown"):
        return f"{shown} (one-sided {_g(d['level'])} per bound)" if shown != "not shown" else shown
    return f"{d['quantity']} [{_g(d['low'], '.3g')}, {_g(d['high'], '.3g')}] (one-sided {_g(d['level'])} per bound)"


def failed_text(rec: dict) -> str:
    """Failed runs per arm (the pre-registered rule), e.g. "a: 1 (seed 2)"; "none"."""
    failed = rec.get("failed") or {}
    return "; ".join(f"{a}: {len(f)} (seed {', '.join(map(str, f))})" for a, f in failed.items()) or "none"


def _pct(x: float, se: float | None = None) -> str:
    return f"{100 * x:.1f}%" + ("" if se is None else f" ± {100 * se:.1f}")


def calibration_section(doc: Doc, profile: str, path: Path = CALIBRATION_FILE) -> None:
    """The whole procedure's simulated rates for this profile's families (benchmarks/calibration.py)."""
    doc.h(3, "The rule's measured error rates, power and seeds (calibration)")
    data = read_json(path).get(profile) if path.exists() else None
    if not data or "families" not in data:
        doc.p(f"No calibration for profile {profile} in {path}: run `python benchmarks/calibration.py "
              f"--profile {profile}`. Without it this report's verdicts come with no measured error rates.")
        return
    doc.p(f"Simulated through the claims stage's code ({data['replicates']} replicates per cell, alpha "
          f"{data['alpha']}, the sequential design: {data['design']}; this profile's families). Family-wise: every "
          "claim of a family false at its supporting boundary (no effect; a difference at the margin; ours off "
          "by the tolerance) -> any supported; every claim true at its contradicting boundary (the effect at "
          "min_effect; the difference at the margin; ours off by the tolerance) -> any contradicted. Each at "
          "most alpha (± one Monte Carlo s.e. shown). Conditions: between-seed sd per run, t noise with 3 degrees "
          "of freedom, one failed run per claim (finite, 5 points low, its training accuracy below the floor) "
          "excluded by the pre-registered rule.")
    doc.table(pd.DataFrame([{"family (tests)": f"{r['family']} ({r['family_tests']})", "condition": r["condition"],
                             "family-wise false supported": _pct(r["fw_false_supported"], r["fw_false_supported_se"]),
                             "family-wise false contradicted": _pct(r["fw_false_contradicted"],
                                                                    r["fw_false_contradicted_se"])}
                            for r in data["families"]]))
    doc.p("Per kind: the worst case per claim (one claim at its boundary while the rest of its family is decided "
          "at once, so that it gets the whole alpha), and at each condition the power (supported at the effect of "
          "interest), the seeds per arm at the stop (mean; the cap is the most) and the coverage of the 95% "
          "interval reported at the stop; last, the power if the failed run were kept (no rule).")
    conds = data["conditions"]
    doc.table(pd.DataFrame([{"family": f"{r['family']} ({r['family_tests']})", "kind (claims)":
                             f"{r['kind']} ({r['claims']})", "boundary": r["boundary"],
                             "worst case false supported / contradicted":
                             f"{_pct(r['worst_false_supported'], r['worst_false_supported_se'])} / "
                             f"{_pct(r['worst_false_contradicted'], r['worst_false_contradicted_se'])}",
                             **{f"{c}: power, seeds, coverage": f"{100 * r['by_condition'][c]['power']:.0f}%, "
                                f"{r['by_condition'][c]['seeds']:.1f} of {r['cap']}, "
                                f"{100 * r['by_condition'][c]['coverage']:.1f}%" for c in conds},
                             "failed run kept: power": f"{100 * r['power_failed_kept']:.0f}%"}
                            for r in data["kinds"]]))
    if data.get("reported"):
        doc.p("Reported values with our mean part of the tolerance off (the rest of the family at its effect of "
              "interest; worst case: the rest decided at once): contradicted must stay within alpha, as the "
              "difference is inside the tolerance.")
        doc.table(pd.DataFrame([{"family": r["family"], "claim": r["claim"],
                                 "our mean off by": f"{r['offset_share']:g} x tolerance "
                                                    f"({r['offset_share'] * r['tolerance']:g})",
                                 "contradicted": _pct(r["contradicted"], r["contradicted_se"]),
                                 "worst case contradicted": _pct(r["worst_contradicted"], r["worst_contradicted_se"]),
                                 "supported": _pct(r["supported"], r["supported_se"])} for r in data["reported"]]))


def _verdict_hours(rec: dict, runs: pd.DataFrame) -> tuple[float | None, str]:
    """Measured device-hours of the runs behind a verdict (its arms' runs at the seeds it used), and where."""
    hashes = {h for a in rec["arms"].values() for h in a["runs"].values()}
    rows = runs[runs["run"].isin(hashes)] if "run" in runs else runs.iloc[:0]
    if rows.empty or "train_seconds" not in rows:
        return None, ""
    where = ", ".join(sorted(set(rows["device_name"].astype(str)))) if "device_name" in rows else ""
    return float(rows["train_seconds"].sum()) / 3600, where


def looks_section(doc: Doc, results: Path) -> None:
    """Per checked claim: the looks taken (seeds per arm, the levels, what happened), stopped or continuing
    and why, its failed runs, and the measured device-hours of the runs its verdict used."""
    path = results / "claims.json"
    if not path.exists():
        return
    data = read_json(path)
    recs = [r for r in data["claims"] if r.get("sequential")]
    if not recs:
        return
    runs = pd.read_csv(results / "runs.csv") if (results / "runs.csv").exists() else pd.DataFrame()
    doc.h(2, "Looks taken and what each verdict cost")
    nxt = read_json(results / "next_look.json") if (results / "next_look.json").exists() else None
    doc.p(f"The design: {data.get('design', recs[0]['sequential']['design'])}. Each row: the looks this claim "
          "took (seeds per arm: what happened), the levels of its last look (supporting / contradicting), why it "
          "stopped or that it goes on, and the training time of the runs behind its verdict (their "
          "`train_seconds`, measured on the device named; a run shared by several claims counts in each)."
          + ("" if nxt is None else " " + _next_text(nxt)))
    rows = []
    for r in recs:
        seq = r["sequential"]
        hours, where = _verdict_hours(r, runs)
        last = seq["looks"][-1] if seq["looks"] else {}
        looks = "; ".join(f"{x['seeds']} seeds: {x['decision']}" for x in seq["looks"])
        rows.append({"claim": r["id"], "looks": looks,
                     "levels (support / contra)": f"{_g(last.get('level_support'))} / {_g(last.get('level_contra'))}",
                     "status": seq["status"] + ("" if seq["status"] == "continue" else f" ({seq['why']})"),
                     "failed runs": failed_text(r), "verdict": r["verdict"],
                     "device-hours": "n/a" if hours is None else f"{hours:.3g}" + (f" ({where})" if where else "")})
    doc.table(pd.DataFrame(rows))


def _next_text(nxt: dict) -> str:
    if nxt.get("look") is None and not nxt.get("adds"):
        return ("Next look: none, every claim has stopped." if nxt.get("seeds") is not None
                else f"Next look: none ({nxt.get('note', 'the fixed plan')}).")
    adds = [f"{e}/{m}/{d}: seeds {', '.join(map(str, s))}" for e, ms in nxt["adds"].items() for m, ds in ms.items()
            for d, s in ds.items()]
    return f"Next look ({nxt['look']}, `l2l adapt`): {nxt['runs']} runs, " + "; ".join(adds) + "."
