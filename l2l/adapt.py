"""`l2l adapt`: run the sequential design's looks until every claim has stopped or a budget is spent.

Each look is one ordinary `dvc exp run` that sets run.yaml's `seeds` to the look (every seed of every
group so far: any look is reproduced by running it again with that run.yaml), so DVC records each
look as an experiment and the train stage trains only the runs the look adds. Before a look starts,
its new runs are priced by `l2l plan`'s cost model (l2l.cost: this machine's calibration, or the
measured throughput of the device named); a look that would pass the budget is not started. After a
look, results/next_look.json (the claims stage's) says what the next one adds. A killed loop resumes
where it stopped: run again, it finds run.yaml's look without its next_look.json and runs that look
again, which trains only its missing runs (finished runs are never retrained; interrupted ones resume).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from l2l.checks import ConfigError
from l2l.config import look_form, look_mapping, with_look
from l2l.cost import THROUGHPUT_FILE, load_throughput, pick_timing, run_costs
from l2l.io import read_json
from l2l.looks import NEXT_LOOK, first_look, sequential_design
from l2l.selection import load_selection, select
from l2l.timing import TIMING_FILE

Runner = Callable[[list[str]], int]
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def hydra_value(v: Any) -> str:
    """A value in the override grammar of `dvc exp run -S` (Hydra's): nested mappings and lists."""
    if isinstance(v, dict):
        for k in v:
            if not NAME.match(str(k)):
                raise ConfigError(f"run.yaml: seeds: {k!r} cannot be written by dvc exp run -S (a name of letters, "
                                  "digits, _ and -)")
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    return str(v)


def dvc_command(profile: str, papers: list[str] | None, look: dict, message: str) -> list[str]:
    return ["dvc", "exp", "run", "-m", message, "-S", f"run.yaml:profile={profile}",
            "-S", f"run.yaml:papers={'all' if papers is None else hydra_value(papers)}",
            "-S", f"run.yaml:++seeds={hydra_value(look_mapping(look))}"]


def _run(cmd: list[str]) -> int:
    return subprocess.run(cmd).returncode


def plan_look(profile: str | None = None, papers: list[str] | str | None = None) -> tuple[dict, str, Any, list]:
    """-> (the look to run next, which look it is in words, the selection's config and claims); an empty
    look when every claim has stopped. Reads run.yaml (through l2l.selection) and results/next_look.json."""
    config, claims = load_selection(profile=profile, papers=papers)
    design = sequential_design(config)
    current = config.profile.look
    state = read_json(NEXT_LOOK) if NEXT_LOOK.exists() else None
    fresh = (current is not None and state is not None and state.get("from") == look_mapping(current)
             and state.get("profile") == config.profile.name and state.get("papers") == (config.papers or "all"))
    if fresh:
        if not state["adds"]:  # type: ignore[index]
            return {}, "every claim has stopped", config, claims
        return look_form(state["seeds"], str(NEXT_LOOK)), f"look {state['look']}", config, claims  # type: ignore[index]
    look = first_look(config, claims, design, current)
    what = "the first look" if current is None else "run.yaml's look, unfinished or not yet checked"
    return look, what, config, claims


def look_cost(config: Any, claims: list, look: dict, throughput: Path, timing: Path,
              device: str | None) -> tuple[int, float]:
    """(runs the look trains that are not done, their estimated hours) by `l2l plan`'s cost model."""
    cfg = select(with_look(config, look), claims)
    costs, _ = run_costs(cfg, load_throughput(throughput, device), timing=pick_timing(device, timing))
    todo = [c for c in costs if not c.done]
    if any(c.hours is None for c in todo):
        raise ConfigError(f"no cost estimate for the look's runs ({throughput}, {timing}): l2l adapt needs one to "
                          "keep to --budget-hours (run benchmarks/throughput.py or benchmarks/run_timing.py)")
    return len(todo), sum(c.hours for c in todo)  # type: ignore[misc]


def adapt(budget_hours: float, profile: str | None = None, papers: list[str] | str | None = None,
          dry_run: bool = False, runner: Runner = _run, throughput: Path = THROUGHPUT_FILE,
          timing: Path = TIMING_FILE, device: str | None = None, max_looks: int = 100) -> int:
    """Run looks until every claim has stopped or the next look would pass `budget_hours` (estimated
    device-hours of the runs this call trains). Returns an exit status."""
    spent = 0.0
    for _ in range(max_looks):
        look, what, config, claims = plan_look(profile, papers)
        if not look:
            print(f"l2l adapt: {what}: nothing left to run (results/next_look.json); ~{spent:.3g} h estimated for "
                  "the looks run here")
            return 0
        runs, hours = look_cost(config, claims, look, throughput, timing, device)
        n = max(len(s) for s in look.values())
        line = f"{what}: up to {n} seeds per arm, {runs} runs to train, ~{hours:.3g} h estimated"
        if spent + hours > budget_hours:
            print(f"l2l adapt: {line}: stopping here, it would pass the budget ({spent:.3g} h spent + {hours:.3g} h > "
                  f"{budget_hours:g} h); run again with a larger --budget-hours to go on")
            return 0
        cmd = dvc_command(config.profile.name, config.papers, look, f"l2l adapt: {what} ({n} seeds per arm)")
        print(f"l2l adapt: {line}\n  {' '.join(cmd)}", flush=True)
        if dry_run:
            return 0
        rc = runner(cmd)
        if rc != 0:
            print(f"l2l adapt: the look's dvc exp run failed (exit {rc}); run l2l adapt again to resume it",
                  file=sys.stderr)
            return rc
        spent += hours
    print(f"l2l adapt: stopped after {max_looks} looks")
    return 0
