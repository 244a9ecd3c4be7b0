"""DVC stage `data`: fetch and verify each dataset of the profile, carve the splits, write
data/prepared/<dataset>/ (uint8 arrays + manifest.json)."""
from l2l import stage
from l2l.data import prepare_dataset
from l2l.selection import load_selection


def run() -> None:
    config, _ = load_selection()  # the selected papers' datasets only
    for dataset in config.profile.datasets:
        manifest = prepare_dataset(config.data, config.profile.split, dataset, f"profiles.{config.profile.name}.split")
        counts = {k: v["count"] for k, v in manifest["splits"].items()}
        stage.log.info("%s: %s; %s", dataset, counts, manifest["split_note"])


if __name__ == "__main__":
    stage.main(run)
