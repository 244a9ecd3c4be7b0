"""Saved views of the MLflow UI's runs tables, so a researcher sees what matters without building the
view by hand: the run name in full, the seed, the test metric and the verdicts as columns, runs grouped by
experiment and model (each group one arm, its seeds inside, the group's row their mean).

MLflow 3's UI shares a view of an experiment's runs table through an experiment tag
``mlflow.sharedViewState.<key>`` holding the view's JSON (the "Share" button writes one), opened by the
link ``#/experiments/<id>?viewStateShareKey=<key>``; the view keys and column ids below are the UI's own
(MLflow 3.17: selectedColumns, columnOrder, columnWidths, groupBy, orderByKey, orderByAsc). The
experiment's description (``mlflow.note.content``, shown on its page) links the view. A leaf module:
l2l.tracking sets the views on the experiments it creates.
"""
from __future__ import annotations

import json

VIEW_KEY = "l2l"  # the share key of the harness's view on every experiment it creates
VIEW_NAME = "l2l-bench"  # its name in the runs page's "Views" menu
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: the experiment tag the UI reads a shared view from
DESCRIPTION_TAG = "mlflow.note.content"
WORKFLOW = "workflowType=machine_learning"  # MLflow 3.17's global toggle: training runs, not GenAI traces


def column(kind: str, name: str) -> str:
    """A runs-table column id: kind attributes | params | metrics | tags, e.g. tags.`l2l.seed`."""
    return f"{kind}.`{name}`"


RUN_NAME = column("attributes", "Run Name")


def _view(name_width: int, columns: list[tuple[str, int]], group_by: list[str], order_by: str,
          search: str = "") -> dict:
    """A runs-table state: the run name column `name_width` pixels wide, then `columns` (id, width)."""
    return {"selectedColumns": [c for c, _ in columns],
            "columnOrder": [RUN_NAME, *(c for c, _ in columns)],
            "columnWidths": {RUN_NAME: name_width, **dict(columns)},
            "groupBy": {"aggregateFunction": "average",
                        "groupByKeys": [{"mode": "tag", "groupByData": k} for k in group_by]} if group_by else None,
            "orderByKey": order_by, "orderByAsc": True, "searchFilter": search}


def training_view() -> dict:
    """The training runs: seed, test metric (final and best-validation epoch), the verdicts of the claims a
    run feeds, training time; grouped by experiment and model, so arms compare side by side."""
    # run names are experiment/model/dataset/s<seed> (RunSpec.label): 360 px holds the paper profile's
    # longest, about 50 characters
    return _view(360, [(column("tags", "l2l.seed"), 60), (column("metrics", "final_test_acc"), 110),
                       (column("tags", "l2l.verdicts"), 320), (column("metrics", "best_test_acc"), 110),
                       (column("metrics", "train_seconds"), 110), (column("attributes", "Dataset"), 200)],
                 ["l2l.experiment", "l2l.model"], column("tags", "mlflow.runName"))


def claims_view() -> dict:
    """The claims: paper, verdict, seeds, our estimate with its interval as the report prints it, the look it
    stopped at (the sequential design's)."""
    return _view(340, [(column("tags", "l2l.paper"), 60), (column("tags", "l2l.verdict"), 190),
                       (column("metrics", "n_a"), 60), (column("tags", "l2l.ours"), 440),
                       (column("metrics", "look"), 60), (column("tags", "l2l.claim"), 500)],
                 [], column("tags", "mlflow.runName"), "tags.`l2l.kind` = 'claim'")  # not the summary run


def view_tags(experiment_id: str, name: str, now_ms: int) -> dict[str, str]:
    """The experiment tags of the harness's saved view (named, so the UI lists it under "Views") and the
    experiment's description linking it. now_ms: the view's creation time (the UI sorts views by it)."""
    claims = name.endswith("-claims")
    state = claims_view() if claims else training_view()
    what = ("paper, verdict, seeds, ours [95% CI] as the report prints it" if claims
            else "seed, test accuracy, verdicts; grouped by experiment and model")
    link = f"#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{WORKFLOW}"
    # the UI's saved-view envelope: name, creation and update times (ms), the view state as a JSON string
    envelope = {"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms,
                "state": json.dumps(state, separators=(",", ":"))}
    return {SHARED_VIEW_TAG + VIEW_KEY: json.dumps(envelope, separators=(",", ":")),
            DESCRIPTION_TAG: f"**[{VIEW_NAME} view]({link})** (Views > {VIEW_NAME}): {what}."}


def view_outdated(tags: dict[str, str], name: str) -> bool:
    """Whether an experiment lacks the harness's view or holds another state than this version's (a store
    made before the view, or by an older harness)."""
    try:
        return json.loads(json.loads(tags[SHARED_VIEW_TAG + VIEW_KEY])["state"]) != (
            claims_view() if name.endswith("-claims") else training_view())
    except (KeyError, TypeError, ValueError):
        return True
