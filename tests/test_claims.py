import json

import numpy as np
import pandas as pd
import pytest
import yaml

from l2l.claims import check, claim_power, load_claims
from l2l.checks import ConfigError
from tests.conftest import REPO, config_of, shipped_params


@pytest.fixture
def params():
    p = shipped_params()
    p["profiles"]["paper"]["experiments"] = {"base": {"method": "conventional"},
                                             "better": {"method": "conventional"}}
    p["profiles"]["smoke"].pop("experiments", None)
    return p


CLAIMS = {
    "papers": {"PX": "A. Author. A paper. 2020."},
    "claims": [
        {"id": "PX-C1", "paper": "PX", "claim": "better beats base.", "kind": "superiority",
         "metric": "final_test_acc", "dataset": "cifar10",
         "arms": {"a": {"experiment": "better", "model": "cnn"}, "b": {"experiment": "base", "model": "cnn"}},
         "reported": "not public", "min_effect": 1.0, "protocol": "test"},
        {"id": "PX-C2", "paper": "PX", "claim": "base reaches 50.", "kind": "reported_value",
         "metric": "final_test_acc", "dataset": "cifar10", "arms": {"a": {"experiment": "base", "model": "cnn"}},
         "reported": {"value": 50.0, "source": "Table 1"}, "tolerance": 1.0, "protocol": "test"},
        {"id": "PX-C3", "paper": "PX", "claim": "same on cifar100.", "kind": "equivalence", "margin": 1.0,
         "metric": "final_test_acc", "dataset": "cifar100",
         "arms": {"a": {"experiment": "better", "model": "cnn"}, "b": {"experiment": "base", "model": "cnn"}},
         "reported": "not public", "protocol": "test"},
        {"id": "PX-C4", "paper": "PX", "claim": "base < better.", "kind": "ordering",
         "metric": "final_test_acc", "dataset": "cifar10",
         "arms": [{"experiment": "base", "model": "cnn"}, {"experiment": "better", "model": "cnn"}],
         "reported": "not public", "protocol": "test"},
    ]}


def write(tmp_path, doc):
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def runs_frame(seeds=range(6), shift=3.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        common = rng.normal(50, 2)  # the seed's shared luck: pairing removes it
        for exp, d in (("base", 0.0), ("better", shift)):
            rows.append({"run": f"{exp}{s}", "experiment": exp, "method": "conventional", "model": "cnn",
                         "dataset": "cifar10", "seed": s, "final_test_acc": common + d + rng.normal(0, 0.3)})
    return pd.DataFrame(rows)


def test_registry_validation_errors(tmp_path, params):
    assert [c.id for c in load_claims(config_of(params), write(tmp_path, CLAIMS))] == ["PX-C1", "PX-C2", "PX-C3", "PX-C4"]
    cases = [
        (("arms", "a", "experiment"), "nope", "claims.yaml: PX-C1.arms.a.experiment: unknown experiment 'nope'"),
        (("kind",), "vibes", "claims.yaml: PX-C1.kind: expected one of superiority"),
        (("arms", "a", "model"), "vgg99", "claims.yaml: PX-C1.arms.a.model: model 'vgg99' is not trained by better"),
        (("paper",), "PZ", "claims.yaml: PX-C1.paper: unknown paper"),
        (("stated_in",), "a blog post", "claims.yaml: PX-C1.stated_in: expected a string starting with one of"),
        (("harness_choices",), {"dataset": 10}, "claims.yaml: PX-C1.harness_choices: expected a mapping"),
        # which batches' latency ratios decide: only on a cost_equivalence claim, a list of batch sizes
        (("latency_batches",), [256], "claims.yaml: PX-C1.latency_batches: unknown field for a superiority claim"),
    ]
    for path, value, message in cases:
        doc = json.loads(json.dumps(CLAIMS))
        d = doc["claims"][0]
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        with pytest.raises(ConfigError) as e:
            load_claims(config_of(params), write(tmp_path, doc))
        assert message in str(e.value) and "\n" not in str(e.value)
    doc = json.loads(json.dumps(CLAIMS))
    del doc["claims"][2]["margin"]
    with pytest.raises(ConfigError, match="PX-C3.margin: expected a positive number for an equivalence claim"):
        load_claims(config_of(params), write(tmp_path, doc))
    params["stats"]["margins"] = {"PX-C3": 0.5}  # params may set the margin instead
    assert load_claims(config_of(params), write(tmp_path, doc))[2].margin == 0.5
    doc["claims"][0].update(stated_in="table 2", harness_choices={"dataset": "CIFAR-10 (the paper: ImageNet)"})
    first = load_claims(config_of(params), write(tmp_path, doc))[0]
    assert (first.stated_in, first.harness_choices) == ("table 2", {"dataset": "CIFAR-10 (the paper: ImageNet)"})
    assert load_claims(config_of(params), write(tmp_path, doc))[1].stated_in == "unconfirmed"  # the default


def test_check_verdicts_not_run_and_holm(tmp_path, params):
    claims = load_claims(config_of(params), write(tmp_path, CLAIMS))
    recs = {r["id"]: r for r in check(claims, runs_frame(), pd.DataFrame(), None, "paper", 0.05, 3)}
    assert recs["PX-C1"]["verdict"] == "supported" and recs["PX-C1"]["comparison"]["paired"]
    assert recs["PX-C4"]["verdict"] == "supported" and len(recs["PX-C4"]["steps"]) == 1
    # base's seeds spread by sd ~2 around 50: 50 is inside our interval, but TOST cannot show it within
    # +-1 on 6 seeds: not excluded is not supported
    c2 = recs["PX-C2"]
    assert c2["comparison"]["ci_low"] < 50 < c2["comparison"]["ci_high"]
    assert c2["verdict"] == "inconclusive" and "neither within the tolerance nor shown outside it" in c2["reason"]
    assert recs["PX-C3"]["verdict"] == "not run" and "not in profile paper" in recs["PX-C3"]["reason"]
    ids = ("PX-C1", "PX-C2", "PX-C4")  # one family (the paper): Holm over the three checked claims (one look)
    from statsmodels.stats.multitest import multipletests
    sup, con = (multipletests([recs[i]["comparison"][p] for i in ids], alpha=0.05, method="holm")[0]
                for p in ("p_value", "p_contra"))
    assert [recs[i]["verdict"] == "supported" for i in ids] == list(sup & ~con)
    assert [recs[i]["verdict"] == "contradicted" for i in ids] == list(con)
    assert {recs[i]["family"] for i in ids} == {"PX"} and recs["PX-C1"]["family_size"] == 3
    json.dumps(list(recs.values()), allow_nan=False)  # the record is JSON-safe


def test_smoke_never_gives_a_verdict_and_one_seed_is_inconclusive(tmp_path, params):
    claims = load_claims(config_of(params), write(tmp_path, CLAIMS))
    recs = {r["id"]: r for r in check(claims, runs_frame(), pd.DataFrame(), None, "smoke", 0.05, 3)}
    assert {r["verdict"] for i, r in recs.items() if i != "PX-C3"} == {"inconclusive (smoke scale)"}
    assert "the statistics alone: supported" in recs["PX-C1"]["reason"]
    two = {r["id"]: r for r in check(claims, runs_frame(seeds=[0, 1]), pd.DataFrame(), None, "smoke", 0.05, 3)}
    assert two["PX-C1"]["verdict"] == "inconclusive (smoke scale)" and "only 2 seeds (< 3)" in two["PX-C1"]["reason"]
    one = {r["id"]: r for r in check(claims, runs_frame(seeds=[0]), pd.DataFrame(), None, "paper", 0.05, 3)}
    assert one["PX-C1"]["verdict"] == "inconclusive" and "seed" in one["PX-C1"]["reason"]


def test_no_effect_is_not_supported_and_reports_seeds_needed(tmp_path, params):
    claims = load_claims(config_of(params), write(tmp_path, CLAIMS))
    rec = check(claims, runs_frame(shift=0.1, seeds=range(3)), pd.DataFrame(), None, "paper", 0.05, 3)[0]
    assert rec["verdict"] == "inconclusive"
    c = rec["comparison"]
    assert c["seeds_needed"] is not None and f"~{c['seeds_needed']} seeds per arm" in rec["reason"]
    # the figure is for the full rule in this family of 3 at min_effect 1.0, with the measured sd
    assert claim_power(claims[0], c["seeds_needed"], c["sd"], 0.05, 3)[0] >= 0.8 > \
        claim_power(claims[0], c["seeds_needed"] - 1, c["sd"], 0.05, 3)[0]
    assert 0 < c["power"] < 0.8


def test_mcnemar_from_predictions(tmp_path, params):
    claims = load_claims(config_of(params), write(tmp_path, CLAIMS))
    runs = runs_frame(seeds=range(3))
    y = np.arange(100) % 10
    preds = {"y_test__cifar10": y}
    for s in range(3):
        better = y.copy()
        base = y.copy()
        base[:12] = (y[:12] + 1) % 10  # base wrong on 12 examples where better is right
        preds[f"better{s}"], preds[f"base{s}"] = better, base
    rec = check(claims, runs, pd.DataFrame(), preds, "paper", 0.05, 3)[0]
    # exact McNemar per seed with b=12, c=0: p = 2 * 0.5**12; Fisher-combined over the three seeds
    from scipy.stats import combine_pvalues
    assert rec["comparison"]["mcnemar_p"] == pytest.approx(combine_pvalues([2 * 0.5 ** 12] * 3).pvalue)


def test_phase_arms_read_phases_csv(tmp_path, params):
    """An arm naming a phase reads the claim's metric of that phase from phases.csv (e.g. generation 0
    of a run that trains several), never the run's final value from runs.csv; no McNemar for it."""
    params["profiles"]["paper"]["experiments"]["better"] = {"method": "generations", "options": {"generations": 1},
                                                          "datasets": ["cifar10"]}
    doc = {"papers": CLAIMS["papers"], "claims": [
        {"id": "PX-C9", "paper": "PX", "claim": "gen0 of better beats base.", "kind": "superiority",
         "metric": "final_test_acc", "dataset": "cifar10",
         "arms": {"a": {"experiment": "better", "model": "cnn", "phase": "gen0"},
                  "b": {"experiment": "base", "model": "cnn"}},
         "reported": "not public", "min_effect": 1.0, "protocol": "test"}]}
    claims = load_claims(config_of(params), write(tmp_path, doc))
    assert claims[0].arm("a").phase == "gen0" and claims[0].arm("a").label == "better/cnn[gen0]"
    runs = runs_frame()
    phases = pd.DataFrame([{"run": f"better{s}", "experiment": "better", "method": "conventional", "model": "cnn",
                            "dataset": "cifar10", "seed": s, "phase": ph, "metric": m, "value": v}
                           for s in range(6) for ph, m, v in (("gen0", "final_test_acc", 10.0 + s),
                                                               ("gen1", "final_test_acc", 99.0),
                                                               ("gen0", "confidence", 0.5))])
    preds = {r: np.zeros(4, np.int16) for r in runs["run"]} | {"y_test__cifar10": np.zeros(4, np.int64)}
    rec = check(claims, runs, phases, preds, "paper", alpha=0.05, min_seeds=3)[0]
    assert rec["arms"]["a"]["values"] == {s: 10.0 + s for s in range(6)}
    assert rec["arms"]["a"]["phase"] == "gen0" and rec["arms"]["b"]["phase"] is None
    assert rec["verdict"] == "contradicted" and rec["comparison"]["mcnemar_p"] is None
    doc["claims"][0]["arms"]["a"]["phase"] = 0
    with pytest.raises(ConfigError, match=r"PX-C9\.arms\.a: expected .*phase"):
        load_claims(config_of(params), write(tmp_path, doc))


def test_families_roles_and_tolerances(tmp_path, params):
    doc = json.loads(json.dumps(CLAIMS))
    doc["claims"][0].update(role="sensitivity", role_reason="another reading")
    claims = load_claims(config_of(params), write(tmp_path, doc))
    assert claims[0].family_key == "PX/sensitivity" and claims[1].family_key == "PX"
    recs = {r["id"]: r for r in check(claims, runs_frame(), pd.DataFrame(), None, "paper", 0.05, 3)}
    assert recs["PX-C1"]["family_size"] == 1 and recs["PX-C2"]["family_size"] == 2
    params["stats"]["tolerances"] = {"PX-C2": 0.5}
    assert load_claims(config_of(params), write(tmp_path, doc))[1].tolerance == 0.5
    for key, value, message in (("role", "main", "PX-C1.role: expected one of primary, sensitivity"),
                                ("min_effect", -1, "PX-C1.min_effect: expected a positive number")):
        bad = json.loads(json.dumps(CLAIMS))
        bad["claims"][0][key] = value
        with pytest.raises(ConfigError, match=message):
            load_claims(config_of(params), write(tmp_path, bad))
    params["stats"]["tolerances"] = {}
    bad = json.loads(json.dumps(CLAIMS))
    del bad["claims"][1]["tolerance"]
    with pytest.raises(ConfigError, match="PX-C2.tolerance: expected a positive number"):
        load_claims(config_of(params), write(tmp_path, bad))


def test_stats_settings_reject_bad_values(params):
    assert config_of(params).stats["min_seeds"] >= 3
    for key, value in (("min_seeds", 2), ("alpha", 0.7), ("planning_sd", 0)):
        with pytest.raises(ConfigError, match=f"params.yaml: stats.{key}: expected"):
            config_of({**params, "stats": {**params["stats"], key: value}})


def test_planted_paper_tables():
    """The issue's planted-table check through the real registry (profile paper): a paper number outside
    the tolerance is never supported, a zero effect below min_effect is contradicted, +1 point at
    sd(diff) 0.3 with 5 seeds is supported in its per-paper family."""
    params = shipped_params()
    claims = {c.id: c for c in load_claims(config_of(params), REPO / "claims.yaml")}
    rng = np.random.default_rng(11)
    rows = []

    def add(exp, model, dataset, values):
        rows.extend({"run": f"{exp}-{model}-{dataset}-{s}", "experiment": exp, "method": "m", "model": model,
                     "dataset": dataset, "seed": s, "final_test_acc": v} for s, v in enumerate(values))

    add("layerwise", "p3_k3", "cifar10", 91.7 + 2.0 + rng.normal(0, 0.5, 8))  # P3-C3: ours 2 points above
    add("layerwise", "p3_k1", "cifar10", 88.3 + rng.normal(0, 0.5, 8))       # P3-C1: on the paper's number
    models = ["vgg16", "cnn", "resnext", "densenet"]
    base = {m: 90 + rng.normal(0, 0.6, 5) for m in models}
    for m in models:
        add("conventional", m, "cifar10", base[m])
    add("l2l_alternating", "vgg16", "cifar10", base["vgg16"] + rng.normal(0, 0.05, 5))     # C1: zero effect
    add("l2l_alternating", "cnn", "cifar10", base["cnn"] + 1.0 + rng.normal(0, 0.3, 5))    # C2: +1 point
    for m in ("resnext", "densenet"):
        add("l2l_alternating", m, "cifar10", base[m] + rng.normal(0, 0.6, 5))
    picked = [claims[i] for i in ("P3-C1", "P3-C3", *(f"P1-C{k}/cifar10/alternating/equal-epochs" for k in range(1, 5)))]
    recs = {r["id"]: r for r in check(picked, pd.DataFrame(rows), pd.DataFrame(), None, "paper", 0.05, 3)}
    assert recs["P3-C3"]["verdict"] == "contradicted"
    assert recs["P3-C1"]["verdict"] == "supported"
    assert recs["P1-C1/cifar10/alternating/equal-epochs"]["verdict"] == "contradicted"
    assert recs["P1-C2/cifar10/alternating/equal-epochs"]["verdict"] == "supported"
    assert recs["P1-C2/cifar10/alternating/equal-epochs"]["family_size"] == 4


def test_fields_metrics_and_overrides_are_checked_when_the_registry_loads(tmp_path, params):
    """Before any training: a misspelt or foreign field, a metric no results table will have, an override
    of a claim that does not exist (or has no such field) are one line naming the place; every kind
    has its row of fields."""
    from l2l.claims import BUILTIN_KINDS, CUSTOM_KINDS, KIND_FIELDS

    assert set(KIND_FIELDS) == set(BUILTIN_KINDS) | set(CUSTOM_KINDS)
    cases = [
        (1, "tolerence", 1.0, "claims.yaml: PX-C2.tolerence: unknown field for a reported_value claim (did you mean "
                              "tolerance?); expected one of arms, claim,"),
        (0, "margin", 1.0, "claims.yaml: PX-C1.margin: unknown field for a superiority claim"),
        (0, "metric", "final_tset_acc", "claims.yaml: PX-C1.metric: expected a metric column of results/runs.csv "
                                        "(did you mean final_test_acc?)"),
    ]
    for i, key, value, message in cases:
        doc = json.loads(json.dumps(CLAIMS))
        doc["claims"][i][key] = value
        with pytest.raises(ConfigError) as e:
            load_claims(config_of(params), write(tmp_path, doc))
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    for key, ids, message in (
            ("tolerances", {"P9-C9": 1.0}, "params.yaml: stats.tolerances.P9-C9: unknown claim id; expected a claim id "
                                           "of claims.yaml"),
            ("tolerances", {"PX-C1": 1.0}, "params.yaml: stats.tolerances.PX-C1: PX-C1 is a superiority claim, which "
                                           "has no tolerance; expected claims of a kind with a tolerance (reported_value)"),
            ("margins", {"PX-C33": 1.0}, "params.yaml: stats.margins.PX-C33: unknown claim id; expected a claim id of "
                                         "claims.yaml (did you mean PX-C3?)")):
        with pytest.raises(ConfigError) as e:
            load_claims(config_of({**params, "stats": {**params["stats"], key: ids}}), write(tmp_path, CLAIMS))
        assert str(e.value) == message or str(e.value).startswith(message), str(e.value)
    # a phase arm names a phase its method declares, and one of that phase's measures
    params["profiles"]["paper"]["experiments"]["better"] = {"method": "generations", "options": {"generations": 1},
                                                          "datasets": ["cifar10"]}
    doc = json.loads(json.dumps(CLAIMS))
    doc["claims"][0]["arms"]["a"]["phase"] = "gen1"
    assert load_claims(config_of(params), write(tmp_path, doc))[0].arm("a").phase == "gen1"
    for phase, metric, message in (("gen2", "final_test_acc", "PX-C1.arms.a.phase: expected a phase of better/cnn whose "
                                                              "measures results/phases.csv holds (gen0, gen1), got 'gen2'"),
                                   ("gen1", "final_tset_acc", "PX-C1.metric: expected a measure of phase gen1 of better "
                                                              "(arm a) (did you mean final_test_acc?)")):
        doc["claims"][0]["arms"]["a"]["phase"], doc["claims"][0]["metric"] = phase, metric
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            load_claims(config_of(params), write(tmp_path, doc))
    # a layerwise run's phases are its model's units (the cnn's three stages), with the stage measures
    params["profiles"]["paper"]["experiments"]["better"] = {"method": "layerwise", "datasets": ["cifar10"]}
    doc["claims"][0]["arms"] = {"a": {"experiment": "better", "model": "cnn", "phase": "stage3"},
                                "b": {"experiment": "better", "model": "cnn", "phase": "stage1"}}
    doc["claims"][0]["metric"] = "ensemble_test_acc"
    assert load_claims(config_of(params), write(tmp_path, doc))[0].arm("a").phase == "stage3"
    doc["claims"][0]["arms"]["a"]["phase"] = "stage4"
    with pytest.raises(ConfigError, match=r"PX-C1.arms.a.phase: expected a phase of better/cnn whose measures "
                                          r"results/phases.csv holds \(stage1, stage2, stage3\), got 'stage4'"):
        load_claims(config_of(params), write(tmp_path, doc))
