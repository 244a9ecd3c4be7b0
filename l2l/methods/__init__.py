"""Training methods: one module each, its entry point ``phases`` and its contract in one
:class:`l2l.methods.base.Method` (``METHOD``), registered here by name (params.yaml's ``method:``)."""
from l2l.methods import conventional, distill, generations, l2l, layerwise
from l2l.methods.base import Method

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (conventional, l2l, layerwise, generations, distill)}
