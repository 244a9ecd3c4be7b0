"""The sequential design on the pipeline: which seeds each look trains.

A look is a DVC experiment whose run.yaml `seeds` holds, per experiment/model/dataset, every seed
trained so far (l2l.config: the plan is then exactly those runs). The claims stage replays the looks
on the runs there are (l2l.claims.check) and writes results/next_look.json: per group the seeds the
next look adds (the next look's seed count for the arms of every claim that continues, and the runs
those require, e.g. a P5 student's teacher), and the whole next look (`seeds`) for run.yaml; `adds`
is empty when every claim has stopped. `l2l adapt` (l2l.adapt) runs looks from it.
"""
from __future__ import annotations

from pathlib import Path

from l2l.checks import ConfigError
from l2l.claims import Claim
from l2l.config import Config, look_mapping
from l2l.methods import METHODS
from l2l.stats import Design

NEXT_LOOK = Path("results/next_look.json")
Group = tuple[str, str, str]


def sequential_design(config: Config) -> Design:
    """The profile's group-sequential design (params stats.sequential)."""
    st, name = config.stats, config.profile.name
    seq = st["sequential"]
    if name not in seq["looks"]:
        raise ConfigError(f"params.yaml: stats.sequential.looks: no looks for profile {name} (has "
                          f"{', '.join(seq['looks']) or 'none'})")
    return Design(tuple(seq["looks"][name]), seq["spending"], seq["futility"], st["min_seeds"])


def design_of(config: Config) -> Design:
    """What the claims stage decides with: the sequential design on a look (run.yaml seeds), else one look
    at the seeds there are (the fixed plan)."""
    if config.profile.look is None:
        return Design(None, config.stats["sequential"]["spending"], 0.0, config.stats["min_seeds"])
    return sequential_design(config)


def claim_groups(config: Config, claims: list[Claim]) -> dict[Group, list[str]]:
    """Every (experiment, model, dataset) the claims' arms need that the profile trains (whatever the
    look), with the claims that need it."""
    trained = config.profiles[config.profile.name].trains()
    out: dict[Group, list[str]] = {}
    for c in claims:
        groups = [(a.experiment, a.model, c.dataset) for a in c.arms]
        if all(g in trained for g in groups):
            for g in groups:
                out.setdefault(g, []).append(c.id)
    return out


def with_required(config: Config, look: dict[Group, tuple[int, ...]]) -> dict[Group, tuple[int, ...]]:
    """The look with the runs its runs require (a distilled student's teacher run, same dataset and seed)."""
    prof = config.profiles[config.profile.name]
    out = dict(look)
    changed = True
    while changed:
        changed = False
        for (e, _, d), seeds in list(out.items()):
            exp = prof.experiments[e]
            for ref in METHODS[exp.method].requires(exp.options).values():
                g = (ref["experiment"], ref["model"], d)
                merged = tuple(sorted(set(out.get(g, ())) | set(seeds)))
                if merged != out.get(g):
                    out[g], changed = merged, True
    return out


def first_look(config: Config, claims: list[Claim], design: Design,
               current: dict[Group, tuple[int, ...]] | None = None) -> dict[Group, tuple[int, ...]]:
    """The look that starts the design: the first look's seeds for every group the claims need, over
    what `current` holds already."""
    assert design.looks is not None
    out = dict(current or {})
    for g in claim_groups(config, claims):
        out[g] = tuple(sorted(set(out.get(g, ())) | set(range(design.looks[0]))))
    return with_required(config, out)


def next_look(config: Config, claims: list[Claim], records: list[dict], design: Design) -> dict:
    """results/next_look.json from the claims stage's records: the next look of every claim that continues
    (and the first look of a selected claim its look does not hold yet)."""
    base = {"profile": config.profile.name, "papers": config.papers or "all", "design": design.text()}
    current = config.profile.look
    if current is None or design.looks is None:
        return {**base, "look": None, "from": None, "seeds": None, "adds": {}, "runs": 0,
                "note": "the fixed plan (run.yaml seeds: profile): `l2l adapt` starts the sequential design at its "
                        "first look", "claims": {}}
    target = dict(current)
    status = {}
    checked = {r["id"]: r for r in records if r.get("sequential")}
    for c in claims:
        r = checked.get(c.id)
        if r is None:  # a selected claim the look does not hold: its first look
            if c.id in {i for ids in claim_groups(config, [c]).values() for i in ids}:
                target = first_look(config, [c], design, target)
                status[c.id] = "first look"
            continue
        seq = r["sequential"]
        status[c.id] = seq["status"]
        if seq["status"] == "continue" and seq["next_seeds"]:
            for a in c.arms:
                g = (a.experiment, a.model, c.dataset)
                target[g] = tuple(sorted(set(target.get(g, ())) | set(range(seq["next_seeds"]))))
    target = with_required(config, target)
    adds = {g: sorted(set(s) - set(current.get(g, ()))) for g, s in target.items()}
    adds = {g: s for g, s in adds.items() if s}
    looks = [r["sequential"]["look"] for r in checked.values()]
    return {**base, "look": (max(looks) if looks else 0) + 1 if adds else None, "from": look_mapping(current),
            "seeds": look_mapping(target), "adds": look_mapping(adds), "runs": sum(map(len, adds.values())),
            "claims": status}
