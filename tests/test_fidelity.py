"""The fidelity table (l2l/fidelity.py) is complete and true: every method option, train setting, model,
split, dataset list and seed count of P1, P2, P4 and P5's experiments is listed with a source; each listed
value is the one params.yaml and the claim records hold; a value that differs in an experiment outside
the primary protocol is covered by a sensitivity claim on that experiment; and docs/papers.md shows the
table as the module renders it."""
from __future__ import annotations

import pytest

from l2l import fidelity
from l2l.claims import load_claims
from l2l.config import load_config
from l2l.methods import METHODS
from tests.conftest import REPO


@pytest.fixture(scope="module")
def config():
    return load_config(REPO / "params.yaml", "paper")


@pytest.fixture(scope="module")
def claims(config):
    return load_claims(config, REPO / "claims.yaml")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _experiments(claims, paper: str, role: str | None = None) -> set[str]:
    return {a.experiment for c in claims if c.paper == paper and (role is None or c.role == role) for a in c.arms}


def _resolved(config, experiment: str, key: str):
    """The value of a setting key in one experiment (KeyError: the key does not apply to it)."""
    e = config.profile.experiments[experiment]
    head, _, rest = key.partition(".")
    if head == "train":
        return _flat(e.train)[rest]
    if head == "split":
        return (e.split or config.profile.split)[rest]
    if head == "seeds":
        return len(e.seeds)
    if head == "datasets":
        return e.datasets
    if head == e.method:
        return e.options[rest]
    raise KeyError(key)


def test_sources_and_sensitivity_claims_are_well_formed(claims):
    by_id = {c.id: c for c in claims}
    keys = set()
    for s in fidelity.SETTINGS:
        assert s.paper in fidelity.PAPERS and any(s.source.startswith(k) for k in fidelity.SOURCE_KINDS), s
        assert (s.paper, s.key) not in keys, f"{s.paper} {s.key} listed twice"
        keys.add((s.paper, s.key))
        for cid in s.sensitivity:
            assert cid in by_id, f"{s.paper} {s.key}: no claim {cid}"
            assert by_id[cid].paper == s.paper and by_id[cid].role == "sensitivity", cid


def unlisted(config, claims, paper: str, settings: list) -> list[str]:
    """The settings of the paper's experiments (method options, train settings, split, datasets, seeds,
    models, VOC data settings) without a row in `settings`."""
    listed = {s.key for s in settings if s.paper == paper}
    needed = {"split.val_size", "datasets", "seeds"}
    for exp in _experiments(claims, paper):
        e = config.profile.experiments[exp]
        needed |= {f"{e.method}.{k}" for k in METHODS[e.method].OPTIONS}
        needed |= {f"train.{k}" for k in _flat(e.train)}
        if "voc2007" in e.datasets:
            needed |= {f"data.voc2007.{k}" for k in ("image_size", "ap_mode", "difficult")}
    needed |= {f"model.{a.model}" for c in claims if c.paper == paper for a in c.arms}
    return sorted(needed - listed)


@pytest.mark.parametrize("paper", fidelity.CHECKED_PAPERS)
def test_every_setting_of_the_protocol_is_listed(config, claims, paper):
    """A new option, train setting, model or experiment without its row in l2l/fidelity.py fails here."""
    missing = unlisted(config, claims, paper, fidelity.SETTINGS)
    assert not missing, f"{paper}: settings without a source in l2l/fidelity.py: {', '.join(missing)}"


def test_an_unlisted_option_is_caught(config, claims, monkeypatch):
    without = [s for s in fidelity.SETTINGS if (s.paper, s.key) != ("P4", "generations.tsd_primary")]
    assert unlisted(config, claims, "P4", without) == ["generations.tsd_primary"]
    monkeypatch.setitem(METHODS["distill"].OPTIONS, "latency_backend", "cudnn")  # a new option, no row yet
    assert unlisted(config, claims, "P5", fidelity.SETTINGS) == ["distill.latency_backend"]


@pytest.mark.parametrize("paper", fidelity.CHECKED_PAPERS)
def test_listed_values_are_the_protocols(config, claims, paper):
    primary, every = _experiments(claims, paper, "primary"), _experiments(claims, paper)
    for s in fidelity.settings(paper):
        head = s.key.split(".")[0]
        if head == "model":
            name, _, arg = s.key.partition(".")[2].partition(".")
            cfg = config.profile.models[name]
            want = {arg: s.value} if arg else s.value
            assert {k: cfg[k] for k in want} == want, s.key
        elif head == "data":
            assert _flat({"voc2007": config.data.voc2007})[s.key.partition(".")[2]] == s.value, s.key
        elif head == "claim":
            field = s.key.partition(".")[2]
            for c in claims:
                if c.paper != paper:
                    continue
                got = getattr(c, field, None) if field in ("margin", "min_effect") else c.extra.get(
                    field, "gap" if field == "end_to_end" and c.kind == "saturation" else None)
                if got is None:
                    continue
                assert got == s.value or (c.role == "sensitivity" and c.id in s.sensitivity), (s.key, c.id, got)
        else:
            applies = {}
            for exp in every:
                try:
                    applies[exp] = _resolved(config, exp, s.key)
                except KeyError:
                    continue
            assert applies, f"{paper} {s.key}: applies to none of the paper's experiments"
            if s.by_experiment:
                assert s.value == applies, s.key
                continue
            for exp, got in applies.items():
                if exp in primary:
                    assert got == s.value, (s.key, exp, got)
                elif head == "datasets":  # a sensitivity experiment may run a subset of the datasets
                    assert set(got) <= set(s.value), (s.key, exp, got)
                elif got != s.value:  # another reading: a sensitivity claim on this experiment says whether it matters
                    covering = [c.id for c in claims if c.id in s.sensitivity and exp in {a.experiment for a in c.arms}]
                    assert covering, f"{paper} {s.key} = {got!r} in {exp}: no sensitivity claim of the row covers it"


def test_docs_show_the_table_as_rendered():
    text = (REPO / "docs" / "papers.md").read_text()
    assert fidelity.docs_block() in text, "docs/papers.md's fidelity table is stale: python -m l2l.fidelity docs/papers.md"


def test_report_section_renders_every_row():
    class Doc:
        def __init__(self):
            self.parts = []

        def h(self, level, text):
            self.parts.append(("h", text))

        def p(self, text):
            self.parts.append(("p", text))

        def table(self, df):
            self.parts.append(("table", df))

    doc = Doc()
    fidelity.report_section(doc)
    df = next(x for kind, x in doc.parts if kind == "table")
    assert len(df) == len(fidelity.SETTINGS) and list(df.columns) == ["paper", "setting", "value", "source",
                                                                      "sensitivity claim"]
    row = df[(df.paper == "P4") & (df.setting == "generations.tsd_primary")].iloc[0]
    assert row["value"] == "argmax" and row["sensitivity claim"] == "P4-C1/label, P4-C2a/label"
    assert row["source"].startswith("text")
