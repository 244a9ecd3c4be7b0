"""DVC stage `aggregate`: runs/ + evals/ -> results/ (pandas tables, curves, metrics for DVC)."""
from l2l import stage
from l2l.config import prepared_plan
from l2l.data import load_prepared
from l2l.results import aggregate
from l2l.selection import load_selection


def run() -> None:
    config, specs, manifests = prepared_plan(load_selection()[0])
    labels = {ds: load_prepared(config.data.prepared_dir(ds), verify=False)[0]["test"][1] for ds in manifests}
    summary = aggregate(specs, manifests, labels, stage.RUNS, stage.EVALS, stage.RESULTS, config.profile.name)
    stage.log.info("results/: %d runs in %d groups", len(specs), len(summary))


if __name__ == "__main__":
    stage.main(run)
