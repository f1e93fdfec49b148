"""The ground floor: what every layer of caer-kit stands on and that imports none of them.

- ``errors``: CaerError, the one exception the CLI turns into one line and an exit status;
- ``labels``: label sets (classes and the descriptors the prompts encode);
- ``runtime``: the one device resolver, precision resolver and distributed helper that
  extract, train-head, finetune, evaluate, predict, explain and ablate share;
- ``text``: the natural sort.

It lives under cache/ because the store is the lowest stage and already needs the error
type, the label sets and the version (a store records them): cache/ may import nothing
from pipeline/ or heads/, so what they all share must sit at or below cache/
(docs/architecture.md). Nothing here imports torch at module level, so extract's workers
stay torch-free.
"""

__version__ = "0.1.0"
