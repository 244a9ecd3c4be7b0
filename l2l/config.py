"""params.yaml -> validated profile -> a plan: one RunSpec per training run.

params.yaml is the single source of truth. Every check fails with one line naming the
key and the expected form, so a typo never turns into a silently different experiment.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")
DATA_SOURCES = ("auto", "download", "mirror", "npz")
OPTIMIZERS = ("sgd",)
SCHEDULES = ("constant", "step", "multistep", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
# Pascal VOC 2007 (l2l/voc.py): the settings of params.yaml's data.voc2007, with their defaults.
VOC_DEFAULTS = {"root": None, "image_size": 128, "val_size": 500, "ap_mode": "area", "difficult": "ignore"}
VOC_AP_MODES = ("area", "11point")
VOC_DIFFICULT_RULES = ("ignore", "positive", "negative")
MULTI_LABEL_DATASETS = ("voc2007",)  # the others are single-label (l2l/tasks.py)


class ConfigError(ValueError):
    """A one-line message naming the offending key and the expected form."""


class DataError(Exception):
    """A data source or prepared array is unusable: one line naming the file and the problem.
    (Raised by l2l.data; defined here so that code catching it need not import torchvision.)"""


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


# --- small typed getters: each error names the full key path -------------------------

def _fail(key: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"params.yaml: {key}: expected {expected}, got {got!r}")


def _get(d: dict, key: str, path: str, default: Any = ...) -> Any:
    if key in d:
        return d[key]
    if default is ...:
        raise ConfigError(f"params.yaml: {path}.{key}: missing")
    return default


def _mapping(v: Any, path: str) -> dict:
    if not isinstance(v, dict):
        raise _fail(path, "a mapping", v)
    return v


def _pos_int(v: Any, path: str, allow_zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        raise _fail(path, "a non-negative integer" if allow_zero else "a positive integer", v)
    return v


def _pos_float(v: Any, path: str, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
        raise _fail(path, "a non-negative number" if allow_zero else "a positive number", v)
    return float(v)


def _choice(v: Any, path: str, choices: tuple[str, ...] | list[str]) -> str:
    if v not in choices:
        raise _fail(path, "one of " + ", ".join(choices), v)
    return v


def _str_list(v: Any, path: str, choices=None) -> list[str]:
    if not isinstance(v, list) or not v or not all(isinstance(s, str) for s in v):
        raise _fail(path, "a non-empty list of names", v)
    for s in v:
        if choices is not None and s not in choices:
            raise _fail(path, "names from " + ", ".join(choices), s)
    return v


def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; everything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# --- validation of the pieces of a profile --------------------------------------------

def validate_train(t: dict, path: str) -> dict:
    _mapping(t, path)
    known = {"epochs", "batch_size", "eval_batch_size", "optimizer", "schedule", "augment", "precision", "compile",
             "deterministic"}
    for k in t:
        if k not in known:
            raise _fail(f"{path}.{k}", "one of the keys " + ", ".join(sorted(known)), k)
    _pos_int(_get(t, "epochs", path), f"{path}.epochs")
    _pos_int(_get(t, "batch_size", path), f"{path}.batch_size")
    _pos_int(t.get("eval_batch_size", 1000), f"{path}.eval_batch_size")
    opt = _mapping(_get(t, "optimizer", path), f"{path}.optimizer")
    _choice(_get(opt, "name", f"{path}.optimizer"), f"{path}.optimizer.name", OPTIMIZERS)
    _pos_float(_get(opt, "lr", f"{path}.optimizer"), f"{path}.optimizer.lr")
    _pos_float(opt.get("momentum", 0.0), f"{path}.optimizer.momentum", allow_zero=True)
    _pos_float(opt.get("weight_decay", 0.0), f"{path}.optimizer.weight_decay", allow_zero=True)
    sch = _mapping(_get(t, "schedule", path), f"{path}.schedule")
    name = _choice(_get(sch, "name", f"{path}.schedule"), f"{path}.schedule.name", SCHEDULES)
    if name == "step":
        _pos_int(_get(sch, "step_size", f"{path}.schedule"), f"{path}.schedule.step_size")
        _pos_float(_get(sch, "gamma", f"{path}.schedule"), f"{path}.schedule.gamma")
    if name == "multistep":
        m = _get(sch, "milestones", f"{path}.schedule")
        if not isinstance(m, list) or not all(isinstance(i, int) and i > 0 for i in m) or m != sorted(m):
            raise _fail(f"{path}.schedule.milestones", "an increasing list of positive epoch numbers", m)
        _pos_float(_get(sch, "gamma", f"{path}.schedule"), f"{path}.schedule.gamma")
    aug = _mapping(t.get("augment", {}), f"{path}.augment")
    _pos_int(aug.get("crop_padding", 0), f"{path}.augment.crop_padding", allow_zero=True)
    if not isinstance(aug.get("flip", False), bool):
        raise _fail(f"{path}.augment.flip", "true or false", aug.get("flip"))
    _choice(t.get("precision", "auto"), f"{path}.precision", PRECISIONS)
    for key in ("compile", "deterministic"):
        if not isinstance(t.get(key, False), bool):
            raise _fail(f"{path}.{key}", "true or false", t.get(key))
    return t


def _seeds(v: Any, path: str) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        raise _fail(path, "a non-empty list of integers", v)
    if len(set(v)) != len(v):
        raise _fail(path, "distinct seeds", v)
    return v


def validate_data(d: Any) -> dict:
    d = _mapping(d, "data")
    _choice(_get(d, "source", "data"), "data.source", DATA_SOURCES)
    if d["source"] == "mirror" and not isinstance(d.get("mirror"), str):
        raise _fail("data.mirror", "a directory path (data.source is mirror)", d.get("mirror"))
    npz = _mapping(d.get("npz") or {}, "data.npz")
    for k, v in npz.items():
        if v is not None and not isinstance(v, str):
            raise _fail(f"data.npz.{k}", "a file path", v)
    _pos_int(d.get("split_seed", 0), "data.split_seed", allow_zero=True)
    voc_config(d)
    return d


def voc_config(data: dict) -> dict:
    """params.yaml data.voc2007 with its defaults filled in (VOC_DEFAULTS), validated."""
    v = _mapping(data.get("voc2007") or {}, "data.voc2007")
    for k in v:
        if k not in VOC_DEFAULTS:
            raise _fail(f"data.voc2007.{k}", "one of the keys " + ", ".join(VOC_DEFAULTS), k)
    v = {**VOC_DEFAULTS, **v}
    if v["root"] is not None and not isinstance(v["root"], str):
        raise _fail("data.voc2007.root", "an extracted VOCdevkit/VOC2007 directory or null", v["root"])
    _pos_int(v["image_size"], "data.voc2007.image_size")
    _pos_int(v["val_size"], "data.voc2007.val_size")
    _choice(v["ap_mode"], "data.voc2007.ap_mode", VOC_AP_MODES)
    _choice(v["difficult"], "data.voc2007.difficult", VOC_DIFFICULT_RULES)
    return v


def dataset_data(params: dict, prof: "Profile", dataset: str) -> dict:
    """What of the data settings a run on `dataset` depends on (part of its RunSpec, so of its hash):
    CIFAR: the profile's split; VOC: its preparation (image size, val split) and its task (metric,
    difficult-only labels). The split seed for both."""
    seed = params["data"].get("split_seed", 0)
    if dataset not in MULTI_LABEL_DATASETS:
        return {**prof.split, "split_seed": seed}
    v = voc_config(params["data"])
    return {"image_size": v["image_size"], "val_size": v["val_size"], "split_seed": seed,
            "task": {"kind": "multi-label", "ap_mode": v["ap_mode"], "difficult": v["difficult"]}}


# --- the plan ------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one training run; its hash is the run's identity."""

    experiment: str
    method: str
    model: str
    dataset: str
    seed: int
    model_cfg: dict = field(hash=False)
    train: dict = field(hash=False)
    options: dict = field(hash=False)  # the method's own options (defaults filled in)
    data: dict = field(hash=False)  # split settings and the prepared data's fingerprint

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(**d)


@dataclass(frozen=True)
class Profile:
    name: str
    seeds: list[int]
    datasets: list[str]
    split: dict
    models: dict
    train: dict
    experiments: dict


def resolve_profile(params: dict, name: str | None = None) -> Profile:
    """Validate params.yaml for one profile (default: params['profile'])."""
    from l2l.data import DATASETS
    from l2l.methods import METHODS
    from l2l.models import ARCHS

    validate_data(params.get("data"))
    profiles = _mapping(_get(params, "profiles", "params"), "profiles")
    name = name if name is not None else _get(params, "profile", "params")
    if name not in profiles:
        raise _fail("profile", "one of the profiles " + ", ".join(profiles), name)
    p = _mapping(profiles[name], f"profiles.{name}")
    base = p.get("extends")
    if base is not None:  # a profile may extend another (smoke = paper with smaller numbers)
        if base not in profiles or base == name:
            raise _fail(f"profiles.{name}.extends", "another profile", base)
        p = deep_merge(_mapping(profiles[base], f"profiles.{base}"), {k: v for k, v in p.items() if k != "extends"})
    path = f"profiles.{name}"
    seeds = _seeds(_get(p, "seeds", path), f"{path}.seeds")
    datasets = _str_list(_get(p, "datasets", path), f"{path}.datasets", DATASETS)
    split = _mapping(_get(p, "split", path), f"{path}.split")
    _pos_int(_get(split, "val_size", f"{path}.split"), f"{path}.split.val_size")
    _pos_int(_get(split, "test_size", f"{path}.split"), f"{path}.split.test_size")
    if split.get("train_subset") is not None:
        _pos_int(split["train_subset"], f"{path}.split.train_subset")
    models = _mapping(_get(p, "models", path), f"{path}.models")
    for m, cfg in models.items():
        _mapping(cfg, f"{path}.models.{m}")
        arch = _choice(_get(cfg, "arch", f"{path}.models.{m}"), f"{path}.models.{m}.arch", list(ARCHS))
        accepted = set(inspect.signature(ARCHS[arch]).parameters) - {"num_classes"}
        for k in cfg:
            if k != "arch" and k not in accepted:
                raise _fail(f"{path}.models.{m}.{k}", f"an argument of {arch} (" + ", ".join(sorted(accepted)) + ")", k)
    train = validate_train(_get(p, "train", path), f"{path}.train")
    experiments = _mapping(_get(p, "experiments", path), f"{path}.experiments")
    for e, ecfg in experiments.items():
        epath = f"{path}.experiments.{e}"
        _mapping(ecfg, epath)
        known = {"method", "models", "datasets", "train", "options"}
        for k in ecfg:
            if k not in known:
                raise _fail(f"{epath}.{k}", "one of the keys " + ", ".join(sorted(known)), k)
        method = _choice(_get(ecfg, "method", epath), f"{epath}.method", list(METHODS))
        _str_list(ecfg.get("models", list(models)), f"{epath}.models", list(models))
        exp_datasets = _str_list(ecfg.get("datasets", datasets), f"{epath}.datasets", DATASETS)
        validate_train(deep_merge(train, _mapping(ecfg.get("train", {}), f"{epath}.train")), f"{epath}.train")
        options = METHODS[method].validate_options(_mapping(ecfg.get("options", {}), f"{epath}.options"),
                                                   f"{epath}.options")
        tasks = METHODS[method].supported_tasks(options)
        for ds in exp_datasets:
            task = "multi-label" if ds in MULTI_LABEL_DATASETS else "single-label"
            if ds in datasets and task not in tasks:
                raise ConfigError(f"params.yaml: {epath}.datasets: method {method} with these options trains on "
                                  f"{' or '.join(tasks)} datasets only, got {ds} ({task})")
    return Profile(name, seeds, datasets, split, models, train, experiments)


def plan(params: dict, fingerprints: dict[str, str] | None = None, profile: str | None = None) -> list[RunSpec]:
    """One RunSpec per (experiment, model, dataset, seed) of the profile, in a stable order.

    fingerprints maps dataset -> the prepared data's fingerprint (from its manifest); it is part
    of every run's identity, so re-prepared data with different content retrains.
    """
    from l2l.methods import METHODS

    prof = resolve_profile(params, profile)
    specs = []
    for exp, ecfg in prof.experiments.items():
        method = METHODS[ecfg["method"]]
        train = deep_merge(prof.train, ecfg.get("train", {}))
        options = method.validate_options(ecfg.get("options", {}), f"profiles.{prof.name}.experiments.{exp}.options")
        for model in ecfg.get("models", list(prof.models)):
            for dataset in [d for d in ecfg.get("datasets", prof.datasets) if d in prof.datasets]:
                data = {**dataset_data(params, prof, dataset), "fingerprint": (fingerprints or {}).get(dataset)}
                for seed in prof.seeds:
                    specs.append(RunSpec(exp, ecfg["method"], model, dataset, seed,
                                         prof.models[model], train, options, data))
    return _resolve_required_runs(specs, prof)


def _requires(spec: RunSpec) -> dict[str, dict]:
    """The runs a spec's method needs finished first: name -> {experiment, model} (same dataset, seed)."""
    from l2l.methods import METHODS

    requires = getattr(METHODS[spec.method], "requires", None)
    return requires(spec.options) if requires else {}


def required_hashes(spec: RunSpec) -> list[str]:
    """Hashes of the runs that must finish before `spec` trains (resolved by plan())."""
    return [spec.options[f"{name}_run"]["hash"] for name in _requires(spec)]


def _resolve_required_runs(specs: list[RunSpec], prof: Profile) -> list[RunSpec]:
    """Put into each spec that requires other runs (a distillation's teacher) their identity,
    options[<name>_run] = {hash, model_cfg}, so that its hash covers theirs: a changed teacher
    retrains its students. Runs that require nothing keep their spec (and hash)."""
    index = {(s.experiment, s.model, s.dataset, s.seed): i for i, s in enumerate(specs)}
    done: dict[int, RunSpec] = {}

    def resolve(i: int, chain: tuple[int, ...]) -> RunSpec:
        if i in done:
            return done[i]
        spec, options = specs[i], dict(specs[i].options)
        for name, ref in _requires(spec).items():
            key = f"profiles.{prof.name}.experiments.{spec.experiment}.options.{name}"
            j = index.get((ref["experiment"], ref["model"], spec.dataset, spec.seed))
            if j is None:
                raise ConfigError(f"params.yaml: {key}: no run of the plan matches it: {_missing(prof, ref, spec)}")
            if j in chain:
                raise ConfigError(f"params.yaml: {key}: a cycle of required runs through {ref['experiment']}")
            req = resolve(j, chain + (i,))
            options[f"{name}_run"] = {"hash": req.hash, "model_cfg": req.model_cfg}
        done[i] = replace(spec, options=options) if options != spec.options else spec
        return done[i]

    return [resolve(i, ()) for i in range(len(specs))]


def _missing(prof: Profile, ref: dict, spec: RunSpec) -> str:
    """What a run reference lacks in the profile (for the one-line error)."""
    e, m = ref["experiment"], ref["model"]
    ecfg = prof.experiments.get(e)
    if ecfg is None:
        return f"experiment {e} is not in profile {prof.name}"
    if m not in ecfg.get("models", list(prof.models)):
        return f"experiment {e} has no model {m}"
    if spec.dataset not in ecfg.get("datasets", prof.datasets):
        return f"experiment {e} does not train on dataset {spec.dataset} (needed by {spec.experiment} {spec.model})"
    return f"experiment {e} model {m} has no run on {spec.dataset} seed {spec.seed}"


def split_config(params: dict, profile: str | None = None):
    """The SplitConfig of the active profile (what the data stage prepares)."""
    from l2l.data import SplitConfig

    prof = resolve_profile(params, profile)
    s = prof.split
    return SplitConfig(val_size=s["val_size"], test_size=s["test_size"],
                       train_subset=s.get("train_subset"), seed=params["data"].get("split_seed", 0))


def source_config(params: dict, dataset: str):
    """The SourceConfig for one dataset, from params.yaml's data section."""
    from l2l.data import SourceConfig

    d = validate_data(params.get("data"))
    root = Path(d.get("root", "data")) / "raw"
    npz = (d.get("npz") or {}).get(dataset)
    kind = d["source"]
    if kind == "auto":  # per dataset: its .npz if one is given, else the mirror if given, else download
        kind = "npz" if npz else "mirror" if d.get("mirror") else "download"
    if kind == "npz" and not npz:
        raise _fail(f"data.npz.{dataset}", "a .npz path (data.source is npz)", npz)
    return SourceConfig(kind=kind, root=root,
                        mirror=Path(d["mirror"]) if d.get("mirror") else None,
                        npz=Path(npz) if npz else None)


def prepared_dir(params: dict, dataset: str) -> Path:
    return Path(params["data"].get("root", "data")) / "prepared" / dataset
