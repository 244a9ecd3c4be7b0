"""DVC stage `data`: fetch and verify each dataset of the profile, carve the splits, write
data/prepared/<dataset>/ (uint8 arrays + manifest.json)."""
from l2l import stage
from l2l.config import load_params, resolve_profile
from l2l.data import prepare_dataset


def run() -> None:
    params = load_params()
    prof = resolve_profile(params)
    for dataset in prof.datasets:
        manifest = prepare_dataset(params, dataset)
        counts = {k: v["count"] for k, v in manifest["splits"].items()}
        stage.log.info("%s: %s; %s", dataset, counts, manifest["split_note"])


if __name__ == "__main__":
    stage.main(run)
