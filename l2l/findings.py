"""What a run of the benchmark found, at a glance: the verdicts counted per paper, and for every primary
claim left undecided what it would take to decide it. The report's first section (report_top) and the
DVC metrics of the claims stage (verdict_counts: `dvc metrics show`, `dvc exp show`) read the same tally."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from l2l.io import read_json
from l2l.report import Doc

# The four outcomes a claim can have; a verdict string starts with one of them ("inconclusive (smoke
# scale)" is inconclusive).
VERDICTS = ("supported", "contradicted", "inconclusive", "not run")


def outcome(verdict: str) -> str:
    """The verdict's outcome (VERDICTS); an unknown verdict is an error, not a fifth column."""
    for v in VERDICTS:
        if verdict.startswith(v):
            return v
    raise ValueError(f"verdict {verdict!r} starts with none of {', '.join(VERDICTS)}")


def is_primary(rec: dict) -> bool:
    return rec.get("role", "primary") == "primary"


def tally(records: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """paper -> outcome -> {"all": claims, "primary": primary claims}, papers in order (P1, P2, ...)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for r in sorted(records, key=lambda r: r["paper"]):
        counts = out.setdefault(r["paper"], {v: {"all": 0, "primary": 0} for v in VERDICTS})[outcome(r["verdict"])]
        counts["all"] += 1
        counts["primary"] += is_primary(r)
    return out


def verdict_counts(records: list[dict]) -> dict[str, dict[str, int]]:
    """DVC's metrics: per paper and for all of them ("all"), claims per outcome (keys without spaces)."""
    counts = {paper: {v.replace(" ", "_"): c[v]["all"] for v in VERDICTS} for paper, c in tally(records).items()}
    counts["all"] = {k: sum(c[k] for c in counts.values()) for k in (v.replace(" ", "_") for v in VERDICTS)}
    return counts


def tally_table(records: list[dict]) -> pd.DataFrame:
    """One row per paper and a total: claims per outcome, primary claims in parentheses."""
    def cell(c: dict[str, int]) -> str:
        return f"{c['all']} ({c['primary']})" if c["all"] else "0"

    rows = []
    counts = tally(records)
    for paper, c in [*counts.items(), ("all", {v: {k: sum(p[v][k] for p in counts.values()) for k in ("all", "primary")}
                                                for v in VERDICTS})]:
        total = {k: sum(c[v][k] for v in VERDICTS) for k in ("all", "primary")}
        rows.append({"paper": f"**{paper}**" if paper == "all" else paper, "claims (primary)": cell(total),
                     **{v: cell(c[v]) for v in VERDICTS}})
    return pd.DataFrame(rows)


def _arm_names(rec: dict) -> str:
    return ", ".join(f"{a['experiment']} ({a['model']})" for a in rec["arms"].values())


def what_it_takes(rec: dict, profile: str) -> str:
    """What would decide an undecided claim: the runs it lacks, or the seeds its rule needs."""
    if outcome(rec["verdict"]) == "not run":
        lacking = [f"{a['experiment']} ({a['model']})" for a in rec["arms"].values() if not a["values"]]
        return (f"runs of {', '.join(lacking) or _arm_names(rec)} on {rec['dataset']}, which profile {profile} "
                "does not train")
    if profile == "smoke":
        return "the paper profile (`dvc repro`): the smoke scale decides nothing"
    c = rec["comparison"]
    n = min(c["n_a"], c.get("n_b") or c["n_a"])
    needed = c.get("seeds_needed")
    seeds = (f"about {needed} seeds per arm for 80% power at the effect of interest ({c['effect_of_interest']:g} "
             f"points) with the sd measured here ({n} now)" if needed is not None else
             f"more seeds than {n} (no power estimate: the between-seed sd could not be measured)")
    if c.get("dropped"):
        seeds += f"; {len(c['dropped'])} run(s) left out (diverged or missing) to retrain"
    return seeds


def first_sentence(text: str) -> str:
    """A claim's first sentence: what it says (the rest says how the harness checks it)."""
    head, sep, _ = text.partition(". ")
    return head + "." if sep else text


def undecided_lines(records: list[dict], profile: str) -> list[str]:
    """One line per primary claim neither supported nor contradicted: id, verdict, what the claim says, and
    what would decide it; papers in order."""
    return [f"- `{r['id']}` **{r['verdict']}**: {first_sentence(r['claim'])} Needs {what_it_takes(r, profile)}."
            for r in sorted(records, key=lambda r: r["paper"])
            if is_primary(r) and outcome(r["verdict"]) in ("inconclusive", "not run")]


def report_top(doc: Doc, results: Path) -> None:
    """The report's first section: the verdicts counted per paper, then every undecided primary claim with
    what would decide it (for report.build's extra_sections, first)."""
    path = results / "claims.json"
    if not path.exists():
        return
    data = read_json(path)
    records, profile = data["claims"], data["profile"]
    doc.h(2, "What it found")
    doc.p("Claims per paper by verdict (primary claims in parentheses; the others are sensitivity claims: other "
          "readings, budgets or datasets of what a paper leaves open). Each claim's line, numbers and tests follow "
          "below.")
    doc.table(tally_table(records))
    lines = undecided_lines(records, profile)
    if lines:
        doc.p(f"**Undecided primary claims** ({len(lines)}), and what would decide each:")
        doc.p("\n".join(lines))
