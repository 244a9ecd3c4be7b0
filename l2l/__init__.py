"""l2l-bench: reproducibility harness for layerwise, layer-to-layer and teacher-student training."""
