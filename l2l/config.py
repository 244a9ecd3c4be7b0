"""params.yaml -> a resolved :class:`Config` -> the plan: one RunSpec per training run.

params.yaml is the single source of truth, and it is closed: every section has its key set and
defaults in one table (train: l2l/spec.py; data and split: l2l/datasets.py; a method's options:
its module; a model's arguments: its builder's signature; executor and stats: here), and an
unknown or misspelled key anywhere is a one-line error naming its full path. Stages call
:func:`load_config` once and pass the typed values down; nothing below a stage reads params.yaml.
Everything that can be known before training is checked here: values, model arguments (each
model is built once on the meta device), method options against the run (Method.check), and
the runs a run requires.

run.yaml, beside params.yaml, is the workspace's selection: `profile`, `papers` and `data` (this
machine's data sources over params.yaml's `data`, key by key). It is the one file `dvc exp run -S
run.yaml:profile=smoke` rewrites (DVC re-dumps a file it sets a value in), so params.yaml, the
shipped configuration, stays as written. A workspace without run.yaml (a test's) may set profile and
papers in params.yaml; with one, params.yaml may not (one home, and DVC tracks run.yaml's).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from l2l.checks import (SOURCE, ConfigError, Key, boolean, choice, config_error, deep_merge, increasing_ints,
                        integer, mapping, name_list, nonneg_float, nonneg_int, number, one_of_keys, optional_str,
                        path_str, pos_float,
                        pos_int, resolve, seeds)
from l2l.datasets import DATASETS, DataSettings, resolve_data, resolve_experiment_split, resolve_split
from l2l.methods import METHODS
from l2l.io import read_json
from l2l.models import ARCHS, build_model, with_defaults
from l2l.spec import RunSpec, resolve_train
from l2l.stats import SPENDING

__all__ = ["Config", "Experiment", "Profile", "load_config", "load_params", "load_workspace", "look_form",
           "look_mapping", "plan", "prepared_plan", "required_hashes", "resolve_config", "restrict", "with_look"]

PARAMS_FILE = Path("params.yaml")
RUN_FILE = Path("run.yaml")
RUN_KEYS = ("profile", "papers", "data", "seeds")  # run.yaml's keys: the workspace's selection and data sources

# --- the sections resolved here (the others live beside the code that uses them) ------------

def _host(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v or "/" in v or " " in v:
        raise config_error(path, "a host name or address (127.0.0.1, 0.0.0.0, a node's address)", v)
    return v


def _http_uri(v: Any, path: str) -> str | None:
    if v is not None and not (isinstance(v, str) and v.startswith(("http://", "https://"))):
        raise config_error(path, "null or an http(s):// URI", v)
    return v


def _auto_bool(v: Any, path: str) -> str | bool:
    if v != "auto" and not isinstance(v, bool):
        raise config_error(path, "auto, true or false", v)
    return v


BACKENDS = ("local", "ray", "slurm")
EXECUTOR: dict[str, Key] = {
    "backend": Key(lambda v, p: choice(v, p, BACKENDS), "local"),
    "runs_per_gpu": Key(pos_int, 1, "concurrent runs (separate processes) sharing one GPU"),
    "cpu_threads": Key(lambda v, p: v if v is None else pos_int(v, p), None,
                       "torch threads of a run on a CPU; null = torch's default where the stage starts"),
    "checkpoint_every": Key(pos_int, 1, "epochs between resume states (always at phase ends); no effect on "
                                        "results, so not part of a run's identity"),
    "checkpoint_min_seconds": Key(nonneg_float, 60.0, "seconds at least between resume states (always at phase "
                                                      "ends): bounds the saving's share of a fast GPU epoch"),
    "cuda_graphs": Key(boolean, False, "each epoch's training step captured once as a CUDA graph and replayed "
                                       "(l2l/graphs.py; same numbers, eager on a CPU); not part of a run's identity"),
    "max_retries": Key(nonneg_int, 2, "times a run whose worker process, node or job died is retried, first in "
                                      "the queue (a run that raises an error is not retried)"),
    "tracking": Key({  # where workers log to MLflow (l2l/tracking.py single_writer; docs/cluster.md)
        "host": Key(_host, "127.0.0.1", "where the train stage's own mlflow server listens: 127.0.0.1 on one "
                                        "machine; 0.0.0.0 or this node's cluster address for other nodes' workers"),
        "port": Key(lambda v, p: v if v is None else integer(v, p, 1), None, "that server's port; null: a free one"),
        "worker_uri": Key(_http_uri, None, "the URI workers log to; null: that server's (this node's name for "
                                           "host 0.0.0.0)"),
    }),
    "stack_seeds": Key(lambda v, p: _stack_seeds(v, p), "auto",
                       "runs differing only by seed trained as one stacked computation (l2l/stacking.py): auto = "
                       "per model the fastest mode measured on this device (benchmarks/throughput.json, l2l/modes.py), "
                       "separate where none is; off; or K: stacks of up to K runs; not part of a run's identity"),
    "ray": Key({
        "address": Key(optional_str, None, "null: a local Ray instance; 'auto' or ray://host:port: a cluster"),
        "cpus_per_run": Key(pos_float, 1),
        "use_gpus": Key(_auto_bool, "auto", "auto: 1/runs_per_gpu GPU per run if the cluster has GPUs when the "
                                            "stage starts; true: always (an autoscaling cluster whose GPU nodes "
                                            "are not up yet); false: CPU"),
        "queue_ahead": Key(nonneg_int, 0, "runs submitted beyond the cluster's slots (0: a retried run goes "
                                          "first; an autoscaling cluster grows on pending runs)"),
    }),
    "slurm": Key({
        "cluster": Key(lambda v, p: choice(v, p, ("slurm", "local")), "slurm"),
        "partition": Key(optional_str, None),
        "account": Key(optional_str, None),
        "timeout_min": Key(pos_int, 240),
        "max_requeue": Key(nonneg_int, 3),
        "gpus_per_task": Key(nonneg_int, 1),
        "cpus_per_task": Key(pos_int, 8),
        "mem_gb": Key(pos_float, 32),
        "array_parallelism": Key(pos_int, 64),
        "folder": Key(path_str, "slurm"),
    }),
}


def _stack_seeds(v: Any, path: str) -> str | int:
    if v is False:  # YAML reads an unquoted off as false
        return "off"
    if v in ("auto", "off"):
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise config_error(path, "auto, off or a number of runs per stack (an integer >= 1)", v)
    return v


def _per_claim(v: Any, path: str) -> dict:
    for cid, m in mapping(v, path).items():
        pos_float(m, f"{path}.{cid}")
    return v


def _looks(v: Any, path: str) -> dict:
    for name, looks in mapping(v, path).items():
        increasing_ints(looks, f"{path}.{name}", low=1, allow_empty=False)
    return v


def _floors(v: Any, path: str) -> dict:
    """profile -> dataset -> floor (%)."""
    for name, floors in mapping(v, path).items():
        one_of_keys(mapping(floors, f"{path}.{name}"), f"{path}.{name}", DATASETS)
        for ds, x in floors.items():
            number(x, f"{path}.{name}.{ds}", 0, 100)
    return v


STATS: dict[str, Key] = {  # how claims are checked (l2l/stats.py: the verdict rule)
    "alpha": Key(lambda v, p: number(v, p, 0, 0.5, low_open=True, high_open=True), 0.05),
    "min_seeds": Key(lambda v, p: integer(v, p, 3), 3,
                     "fewer seeds in an arm -> inconclusive (a t-test on 2 seeds has 1 degree of freedom)"),
    "planning_sd": Key(pos_float, 0.6, "between-seed sd (points) of a run's metric for `l2l plan`'s power "
                                        "until runs exist"),
    "margins": Key(_per_claim, {}, "claim id -> equivalence margin (accuracy points), overriding claims.yaml"),
    "tolerances": Key(_per_claim, {}, "claim id -> reported-value tolerance (points), overriding claims.yaml"),
    "failed_run": Key({  # pre-registered: which runs count as failed (l2l.claims.failed_runs)
        "train_acc_floor": Key(_floors, {"paper": {"cifar10": 11.0, "cifar100": 2.0, "voc2007": 10.0}, "smoke": {}},
                               "profile -> dataset -> final training accuracy (mAP on VOC) below which a run failed"),
        "max_per_arm": Key(nonneg_int, 1, "more failed runs than this in an arm -> inconclusive"),
    }),
    "sequential": Key({  # the group-sequential design (l2l.stats.Design; l2l adapt)
        "looks": Key(_looks, {"paper": [3, 5, 8, 13, 20], "smoke": [2, 3]},
                     "profile -> seeds per arm at each look (the last: the cap)"),
        "spending": Key(lambda v, p: choice(v, p, SPENDING), "obrien_fleming"),
        "futility": Key(lambda v, p: number(v, p, 0, 1, high_open=True), 0.1,
                        "stop a claim whose chance of a decision by the cap is below this (0: never)"),
    }),
}

TOP_LEVEL = ("profile", "papers", "seeds", "data", "executor", "stats", "profiles")
PROFILE_KEYS = ("extends", "seeds", "datasets", "split", "models", "train", "experiments")
EXPERIMENT_KEYS = ("method", "models", "datasets", "seeds", "split", "train", "options")


@dataclass(frozen=True)
class Experiment:
    method: str
    models: list[str]
    datasets: list[str]  # those of the profile's datasets it trains on
    seeds: list[int]
    train: dict  # resolved
    options: dict  # resolved (the method's defaults filled in)
    split: dict  # resolved (l2l.datasets.EXPERIMENT_SPLIT): val_size 0, or None for the profile's split


@dataclass(frozen=True)
class Profile:
    name: str
    seeds: list[int]
    datasets: list[str]
    split: dict  # resolved (l2l.datasets.SPLIT)
    models: dict[str, dict]  # name -> resolved model config {arch, every argument}
    train: dict  # resolved
    experiments: dict[str, Experiment]
    # the (experiment, model, dataset) combinations the plan keeps; None: all (l2l.selection narrows it)
    only: frozenset[tuple[str, str, str]] | None = None
    # a look of the sequential design (run.yaml seeds): the seeds of every group it trains, no other group;
    # None: every experiment's own seeds (the fixed plan)
    look: dict[tuple[str, str, str], tuple[int, ...]] | None = None

    def trains(self) -> set[tuple[str, str, str]]:
        """Every (experiment, model, dataset) this profile trains."""
        return {(e, m, d) for e, exp in self.experiments.items() for m in exp.models for d in exp.datasets
                if (self.only is None or (e, m, d) in self.only) and (self.look is None or (e, m, d) in self.look)}

    def seeds_of(self, group: tuple[str, str, str]) -> list[int]:
        """The seeds a group trains: the look's, else its experiment's."""
        return list(self.look[group]) if self.look is not None else self.experiments[group[0]].seeds


@dataclass(frozen=True)
class Config:
    """params.yaml resolved: the active profile, every profile (all checked), and the other sections."""

    profile: Profile
    profiles: dict[str, Profile]
    data: DataSettings
    executor: dict
    stats: dict
    papers: list[str] | None = None  # the selected papers (run.yaml `papers`); None: all


def load_params(path: Path | str = PARAMS_FILE) -> dict:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (run from the repository root)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def load_workspace(path: Path | str = PARAMS_FILE, run: Path | str | None = RUN_FILE) -> dict:
    """params.yaml with the workspace's run.yaml over it (profile, papers; data key by key)."""
    params = load_params(path)
    if run is None or not Path(run).exists():
        return params
    sel = load_params(run)
    for k in sel:
        if k not in RUN_KEYS:
            raise config_error(k, "one of " + ", ".join(RUN_KEYS), problem="unknown key", source=str(run))
    for k in ("profile", "papers", "seeds"):
        if k in params:
            raise config_error(k, problem=f"set in {run} (the workspace's selection), not here", source=str(path))
    profiles = params.get("profiles")
    if isinstance(profiles, dict) and profiles and sel.get("profile") not in profiles:
        raise config_error("profile", "one of " + ", ".join(profiles), sel.get("profile"), source=str(run))
    papers = sel.get("papers", "all")
    if papers != "all" and not (isinstance(papers, list) and papers and all(isinstance(x, str) for x in papers)):
        raise config_error("papers", "all or a non-empty list of paper ids (claims.yaml papers:)", papers,
                           source=str(run))
    if "seeds" in sel:
        look_form(sel["seeds"], str(run))
    out = {**params, **{k: sel[k] for k in ("profile", "papers", "seeds") if k in sel}}
    if sel.get("data") is not None:
        if not isinstance(sel["data"], dict):
            raise config_error("data", "a mapping of params.yaml data keys", sel["data"], source=str(run))
        out["data"] = deep_merge(params.get("data") or {}, sel["data"])
    return out


def load_config(path: Path | str = PARAMS_FILE, profile: str | None = None,
                run: Path | str | None = RUN_FILE) -> Config:
    """The workspace's configuration (params.yaml + run.yaml); `profile` overrides the selected one."""
    params = load_workspace(path, run)
    with named_by_run_file(run):
        return resolve_config(params, profile)


@contextlib.contextmanager
def named_by_run_file(run: Path | str | None = RUN_FILE) -> Iterator[None]:
    """A ConfigError about a key that run.yaml sets names run.yaml, not params.yaml: run.yaml's keys reach
    the checks merged over params.yaml's (e.g. `-S 'run.yaml:++data.npz.cifar11=...'` is
    ``run.yaml: data.npz.cifar11: unknown key; ...``). Any key run.yaml may hold, by its key path."""
    try:
        yield
    except ConfigError as e:
        text, prefix = str(e), f"{SOURCE}: "
        if run is None or not text.startswith(prefix) or not Path(run).exists():
            raise
        node: Any = load_params(run)
        for part in text[len(prefix):].split(": ", 1)[0].split("."):
            if not isinstance(node, dict) or part not in node:
                raise
            node = node[part]
        raise ConfigError(f"{run}: {text[len(prefix):]}") from None


def resolve_config(params: dict, profile: str | None = None) -> Config:
    """Check all of params.yaml (every profile, closed at every level) and resolve it; `profile`
    overrides params['profile'] as the active one."""
    one_of_keys(params, "params", TOP_LEVEL)
    data = resolve_data(params.get("data"))
    profiles = mapping(params.get("profiles"), "profiles")
    if not profiles:
        raise config_error("profiles", "at least one profile", profiles)
    name = profile if profile is not None else params.get("profile")
    choice(name, "profile", list(profiles))
    papers = params.get("papers", "all")
    if papers != "all":
        papers = name_list(papers, "papers")  # validated against claims.yaml's papers by l2l.selection
    resolved = {p: _resolve_profile(profiles, p, data) for p in profiles}
    stats = resolve(STATS, params.get("stats"), "stats")
    for key in ("sequential.looks", "failed_run.train_acc_floor"):  # keyed by profile
        section, sub = key.split(".")
        for p in stats[section][sub]:
            choice(p, f"stats.{key}", list(profiles))
    active = resolved[name]
    if params.get("seeds", "profile") != "profile":
        active = _with_look(active, look_form(params["seeds"], str(RUN_FILE)))
    return Config(active, resolved, data, resolve(EXECUTOR, params.get("executor"), "executor"), stats,
                  None if papers == "all" else papers)


# --- a look of the sequential design (run.yaml seeds) -------------------------------------

def look_form(v: Any, source: str) -> dict[tuple[str, str, str], tuple[int, ...]] | None:
    """run.yaml seeds: "profile" (None: the fixed plan) or experiment -> model -> dataset -> seeds."""
    if v == "profile":
        return None
    form = "profile, or a mapping experiment -> model -> dataset -> a list of seeds (a look: l2l adapt writes it)"
    if not isinstance(v, dict) or not v:
        raise config_error("seeds", form, v, source=source)
    out = {}
    for e, models in v.items():
        if not isinstance(models, dict) or not models:
            raise config_error(f"seeds.{e}", "a mapping model -> dataset -> seeds", models, source=source)
        for m, datasets in models.items():
            if not isinstance(datasets, dict) or not datasets:
                raise config_error(f"seeds.{e}.{m}", "a mapping dataset -> seeds", datasets, source=source)
            for d, s in datasets.items():
                try:
                    out[(str(e), str(m), str(d))] = tuple(seeds(s, f"seeds.{e}.{m}.{d}"))
                except ConfigError as err:
                    raise ConfigError(str(err).replace("params.yaml:", f"{source}:", 1)) from None
    return out


def look_mapping(look: dict[tuple[str, str, str], Any]) -> dict:
    """The nested form of a look (what run.yaml holds): experiment -> model -> dataset -> sorted seeds."""
    out: dict = {}
    for (e, m, d), s in sorted(look.items()):
        out.setdefault(e, {}).setdefault(m, {})[d] = sorted(int(x) for x in s)
    return out


def with_look(config: Config, look: dict[tuple[str, str, str], tuple[int, ...]]) -> Config:
    """The workspace's configuration with its active profile training `look` (papers not yet applied)."""
    return replace(config, profile=_with_look(config.profiles[config.profile.name], look))


def _with_look(prof: Profile, look: dict[tuple[str, str, str], tuple[int, ...]]) -> Profile:
    """The profile training exactly the look's groups at the look's seeds (each a group of the profile)."""
    groups = {(e, m, d) for e, exp in prof.experiments.items() for m in exp.models for d in exp.datasets}
    for e, m, d in look:
        if (e, m, d) not in groups:
            raise config_error(f"seeds.{e}.{m}.{d}", problem=f"profile {prof.name} does not train model {m} of "
                               f"experiment {e} on {d}", source=str(RUN_FILE))
    out = replace(prof, look=dict(look))
    try:
        _resolve_required_runs(_specs(out, None, {}), out)  # every run a look's run requires is in the look
    except ConfigError as e:
        raise ConfigError(f"{RUN_FILE}: seeds: a look must hold every run its runs require ({e})") from None
    return out


def restrict(config: Config, keep: set[tuple[str, str, str]]) -> Config:
    """The config whose active profile trains only `keep` ((experiment, model, dataset)), on the
    datasets those need; the runs kept are the same runs (same hashes) as in the whole profile."""
    prof = config.profile
    datasets = [d for d in prof.datasets if any(k[2] == d for k in keep)]
    return replace(config, profile=replace(prof, datasets=datasets, only=frozenset(keep)))


# --- profiles ---------------------------------------------------------------------------

def merge_train(base: dict, override: dict) -> dict:
    """An experiment's train settings over its profile's (key by key); a schedule of another name
    replaces the base's schedule whole (its keys belong to the other schedule)."""
    out = deep_merge(base, override)
    sch = override.get("schedule")
    if isinstance(sch, dict) and "name" in sch and sch["name"] != (base.get("schedule") or {}).get("name"):
        out["schedule"] = dict(sch)
    return out


def _resolve_profile(profiles: dict, name: str, data: DataSettings) -> Profile:
    path = f"profiles.{name}"
    p = mapping(profiles[name], path)
    one_of_keys(p, path, PROFILE_KEYS)
    base = p.get("extends")
    if base is not None:  # a profile may extend another (smoke = paper with smaller numbers)
        if base not in profiles or base == name:
            raise config_error(f"{path}.extends", "another profile (" + ", ".join(x for x in profiles if x != name) + ")",
                               base)
        parent = mapping(profiles[base], f"profiles.{base}")
        if parent.get("extends") is not None:
            raise config_error(f"{path}.extends", "a profile that extends no other", base)
        p = deep_merge(parent, {k: v for k, v in p.items() if k != "extends"})
    for key in ("seeds", "datasets", "split", "models", "train", "experiments"):
        if key not in p:
            raise config_error(f"{path}.{key}", problem="missing")
    prof_seeds = seeds(p["seeds"], f"{path}.seeds")
    datasets = name_list(p["datasets"], f"{path}.datasets", list(DATASETS))
    split = resolve_split(p["split"], f"{path}.split")
    models = {m: _resolve_model(cfg, f"{path}.models.{m}", datasets)
              for m, cfg in mapping(p["models"], f"{path}.models").items()}
    train_raw = mapping(p["train"], f"{path}.train")
    train = resolve_train(train_raw, f"{path}.train")
    experiments = {e: _resolve_experiment(ecfg, f"{path}.experiments.{e}", train_raw, models, datasets, prof_seeds)
                   for e, ecfg in mapping(p["experiments"], f"{path}.experiments").items()}
    prof = Profile(name, prof_seeds, datasets, split, models, train, experiments)
    specs = _specs(prof, data, {})
    checked = set()
    for spec in specs:  # plan-time checks of each run's options against its model and data (seeds alike)
        if (spec.experiment, spec.model, spec.dataset) not in checked:
            checked.add((spec.experiment, spec.model, spec.dataset))
            METHODS[spec.method].check(spec, DATASETS[spec.dataset].num_classes,
                                       f"{path}.experiments.{spec.experiment}.options")
    _resolve_required_runs(specs, prof)  # every required run exists, no cycle
    return prof


def _resolve_experiment(ecfg: Any, path: str, train_raw: dict, models: dict, datasets: list[str],
                        prof_seeds: list[int]) -> Experiment:
    ecfg = mapping(ecfg, path)
    one_of_keys(ecfg, path, EXPERIMENT_KEYS)
    if "method" not in ecfg:
        raise config_error(f"{path}.method", problem="missing")
    method = choice(ecfg["method"], f"{path}.method", list(METHODS))
    exp_models = name_list(ecfg.get("models", list(models)), f"{path}.models", list(models))
    exp_datasets = name_list(ecfg.get("datasets", datasets), f"{path}.datasets", list(DATASETS))
    exp_seeds = seeds(ecfg.get("seeds", prof_seeds), f"{path}.seeds")
    train = resolve_train(merge_train(train_raw, mapping(ecfg.get("train", {}), f"{path}.train")), f"{path}.train")
    options = METHODS[method].validate_options(mapping(ecfg.get("options", {}), f"{path}.options"), f"{path}.options")
    tasks = METHODS[method].supported_tasks(options)
    for ds in exp_datasets:
        if ds in datasets and DATASETS[ds].task not in tasks:
            raise ConfigError(f"params.yaml: {path}.datasets: method {method} with these options trains on "
                              f"{' or '.join(tasks)} datasets only, got {ds} ({DATASETS[ds].task})")
    split = resolve_experiment_split(ecfg.get("split"), f"{path}.split")
    return Experiment(method, exp_models, [d for d in exp_datasets if d in datasets], exp_seeds, train, options, split)


# --- models: the builder's signature is the schema ---------------------------------------

def _model_arg_check(annotation: str):
    """The check of a model argument from its annotation (the builders annotate every argument)."""
    optional = "None" in annotation
    base = annotation.replace("| None", "").strip()
    checks = {"int": pos_int, "float": pos_float, "bool": boolean,
              "list[int]": lambda v, p: _int_list(v, p), "str": lambda v, p: path_str(v, p)}
    if base not in checks:
        raise TypeError(f"model argument annotation {annotation!r} has no check")
    check = checks[base]
    return (lambda v, p: v if v is None else check(v, p)) if optional else check


def _int_list(v: Any, path: str) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise config_error(path, "a list of non-negative integers", v)
    return [nonneg_int(i, path) for i in v]


def _resolve_model(cfg: Any, path: str, datasets: list[str]) -> dict:
    """A model's config with every argument of its builder filled in, each checked by type, and the
    model built once on the meta device (no memory) for each image size the profile trains on, so a
    value its builder refuses (a CIFAR ResNet of depth 7) fails here, naming the model's key path."""
    cfg = mapping(cfg, path)
    arch = choice(cfg.get("arch"), f"{path}.arch", list(ARCHS))
    params = {k: p for k, p in inspect.signature(ARCHS[arch]).parameters.items() if k != "num_classes"}
    for k in cfg:
        if k != "arch" and k not in params:
            raise config_error(f"{path}.{k}", f"an argument of {arch} (" + ", ".join(sorted(params)) + ")",
                               problem="unknown key")
    out = with_defaults(cfg)
    for k, p in params.items():
        out[k] = _model_arg_check(str(p.annotation))(out[k], f"{path}.{k}")
    try:
        with torch.device("meta"):
            build_model(out, max(DATASETS[d].num_classes for d in datasets))
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:
        raise config_error(path, "arguments its builder accepts", problem=" ".join(str(e).split())) from None
    return out


# --- the plan ---------------------------------------------------------------------------

def _specs(prof: Profile, data: DataSettings | None, fingerprints: dict[str, str]) -> list[RunSpec]:
    specs = []
    for exp, e in prof.experiments.items():
        for model in e.models:
            for dataset in e.datasets:
                if prof.only is not None and (exp, model, dataset) not in prof.only:
                    continue
                if prof.look is not None and (exp, model, dataset) not in prof.look:
                    continue
                run_data = ({} if data is None else
                            {**data.run_data(prof.split, dataset, e.split), "fingerprint": fingerprints.get(dataset)})
                for seed in prof.seeds_of((exp, model, dataset)):
                    specs.append(RunSpec(exp, e.method, model, dataset, seed, prof.models[model], e.train, e.options,
                                         run_data))
    return specs


def plan(config: Config, fingerprints: dict[str, str] | None = None) -> list[RunSpec]:
    """One RunSpec per (experiment, model, dataset, seed) of the active profile, in a stable order.

    fingerprints maps dataset -> the prepared data's fingerprint (from its manifest); it is part
    of every run's identity, so re-prepared data with different content retrains.
    """
    return _resolve_required_runs(_specs(config.profile, config.data, fingerprints or {}), config.profile)


def manifests(config: Config) -> dict[str, dict]:
    """The data stage's manifest of each dataset of the active profile."""
    out = {}
    for ds in config.profile.datasets:
        path = config.data.prepared_dir(ds) / "manifest.json"
        if not path.exists():
            raise ConfigError(f"{path}: not found: run the data stage first (dvc repro data)")
        out[ds] = read_json(path)
    return out


def prepared_plan(config: Config | None = None) -> tuple[Config, list[RunSpec], dict[str, dict]]:
    """params.yaml resolved once (unless given), the active profile's plan on the prepared data
    (its fingerprints are part of every run's identity) and the data's manifests."""
    config = config or load_config()
    mans = manifests(config)
    return config, plan(config, {ds: m["fingerprint"] for ds, m in mans.items()}), mans


def required_hashes(spec: RunSpec) -> list[str]:
    """Hashes of the runs that must finish before `spec` trains (resolved by plan())."""
    return [spec.options[f"{name}_run"]["hash"] for name in METHODS[spec.method].requires(spec.options)]


def _resolve_required_runs(specs: list[RunSpec], prof: Profile) -> list[RunSpec]:
    """Put into each spec that requires other runs (a distillation's teacher) their identity,
    options[<name>_run] = {hash, model_cfg}, so that its hash covers theirs: a changed teacher
    retrains its students. Runs that require nothing keep their spec (and hash)."""
    index = {(s.experiment, s.model, s.dataset, s.seed): i for i, s in enumerate(specs)}
    done: dict[int, RunSpec] = {}

    def resolve_one(i: int, chain: tuple[int, ...]) -> RunSpec:
        if i in done:
            return done[i]
        spec, options = specs[i], dict(specs[i].options)
        for name, ref in METHODS[spec.method].requires(spec.options).items():
            key = f"profiles.{prof.name}.experiments.{spec.experiment}.options.{name}"
            j = index.get((ref["experiment"], ref["model"], spec.dataset, spec.seed))
            if j is None:
                raise config_error(key, "a run of the plan", ref, problem=f"no run matches it: {_missing(prof, ref, spec)}")
            if j in chain:
                raise config_error(key, "no cycle of required runs", ref["experiment"])
            req = resolve_one(j, chain + (i,))
            options[f"{name}_run"] = {"hash": req.hash, "model_cfg": req.model_cfg}
        done[i] = replace(spec, options=options) if options != spec.options else spec
        return done[i]

    return [resolve_one(i, ()) for i in range(len(specs))]


def _missing(prof: Profile, ref: dict, spec: RunSpec) -> str:
    """What a run reference lacks in the profile (for the one-line error)."""
    e, m = ref["experiment"], ref["model"]
    exp = prof.experiments.get(e)
    if exp is None:
        return f"experiment {e} is not in profile {prof.name}"
    if m not in exp.models:
        return f"experiment {e} has no model {m}"
    if spec.dataset not in exp.datasets:
        return f"experiment {e} does not train on dataset {spec.dataset} (needed by {spec.experiment} {spec.model})"
    return f"experiment {e} model {m} has no run on {spec.dataset} seed {spec.seed}"
