"""DVC stage `data`: fetch and verify each dataset of the profile, carve the splits, write
data/prepared/<dataset>/ (uint8 arrays + manifest.json)."""
from l2l import stage
from l2l.config import load_params, prepared_dir, resolve_profile, source_config, split_config
from l2l.data import prepare


def run() -> None:
    params = load_params()
    prof = resolve_profile(params)
    for dataset in prof.datasets:
        manifest = prepare(dataset, source_config(params, dataset), split_config(params), prepared_dir(params, dataset))
        counts = {k: v["count"] for k, v in manifest["splits"].items()}
        stage.log.info("%s: %s; %s", dataset, counts, manifest["split_note"])


if __name__ == "__main__":
    stage.main(run)
