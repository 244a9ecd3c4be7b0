"""Run or plan some papers, not the whole benchmark: run.yaml's `papers` (or `l2l plan --papers`).

The selected papers' claims name their arms (experiment, model, dataset); the plan keeps exactly
those runs of the active profile, plus the runs they require (a P5 student's teacher run, and
its requirements in turn), on the datasets those need, and nothing else. The runs kept are the
same runs as in the whole profile (same hashes), so a selection never trains anything twice:
finished runs count wherever they came from. The claims stage checks the selected papers' claims
only (Holm within each family as before: families are per paper).
"""
from __future__ import annotations

from pathlib import Path

from l2l.checks import ConfigError, config_error
from l2l.claims import CLAIMS_FILE, Claim, load_claims
from l2l.config import (PARAMS_FILE, RUN_FILE, Config, load_workspace, named_by_run_file, plan, resolve_config,
                        restrict)
from l2l.methods import METHODS

__all__ = ["load_selection", "select", "selected_claims"]


def selected_claims(config: Config, claims: list[Claim]) -> list[Claim]:
    return [c for c in claims if config.papers is None or c.paper in config.papers]


def select(config: Config, claims: list[Claim], source: str = str(RUN_FILE)) -> Config:
    """The config whose plan holds only the runs the selected papers' claims need (all: unchanged).
    A paper that is not in claims.yaml, or whose claims the profile trains no arm of, is an error."""
    if config.papers is None:
        return config
    known = sorted({c.paper for c in claims})
    for p in config.papers:
        if p not in known:
            raise config_error("papers", "paper ids of claims.yaml (" + ", ".join(known) + ")", p, source=source)
    prof = config.profile
    trained = config.profiles[prof.name].trains()  # whatever a look trains: the datasets stay the papers' own
    keep = {(a.experiment, a.model, c.dataset) for c in selected_claims(config, claims) for a in c.arms} & trained
    if not keep:
        raise config_error("papers", problem=f"profile {prof.name} trains no arm of the claims of "
                                             + ", ".join(config.papers), source=source)
    specs = plan(config)
    while True:  # the runs kept runs require (teachers), until nothing is added
        more = {(ref["experiment"], ref["model"], s.dataset) for s in specs if (s.experiment, s.model, s.dataset) in keep
                for ref in METHODS[s.method].requires(s.options).values()} - keep
        if not more:
            return restrict(config, keep)
        keep |= more


def load_selection(path: Path | str = PARAMS_FILE, claims_path: Path | str = CLAIMS_FILE,
                   profile: str | None = None, run: Path | str | None = RUN_FILE,
                   papers: list[str] | str | None = None) -> tuple[Config, list[Claim]]:
    """The workspace's configuration narrowed to its selected papers, and their claims (none
    without a claims file). `papers` (a list, or "all") overrides run.yaml's, as `l2l plan --papers`."""
    params = load_workspace(path, run)
    source = str(run) if run is not None and Path(run).exists() else str(path)
    if papers is not None:
        params = {**params, "papers": papers}
        source = "--papers"
    with named_by_run_file(run):
        config = resolve_config(params, profile)
    if not Path(claims_path).exists():
        if config.papers is not None:
            raise ConfigError(f"{claims_path}: file not found (papers selects claims from it)")
        return config, []
    claims = load_claims(config, Path(claims_path))
    return select(config, claims, source), selected_claims(config, claims)
