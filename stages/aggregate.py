"""DVC stage `aggregate`: runs/ + evals/ -> results/ (pandas tables, curves, metrics for DVC)."""
from l2l import stage
from l2l.config import prepared_dir
from l2l.data import load_prepared
from l2l.results import aggregate


def run() -> None:
    params, specs, manifests = stage.current_plan()
    labels = {ds: load_prepared(prepared_dir(params, ds), verify=False)[0]["test"][1] for ds in manifests}
    summary = aggregate(specs, manifests, labels, stage.RUNS, stage.EVALS, stage.RESULTS, params["profile"])
    stage.log.info("results/: %d runs in %d groups", len(specs), len(summary))


if __name__ == "__main__":
    stage.main(run)
