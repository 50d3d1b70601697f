"""Prints, as one JSON line, where this process resolves the bare names of avssl's folders and the
avssl subpackages; with --ray, a Ray task prints the same from a worker.

Run as `python -m tests.probe_imports` from the repository root (sys.path[0] is then the
checkout, as for `python -m pytest` or `avssl submit`'s job), or by path from anywhere.
It imports transformers' hub-kernel integration, which imports Hugging Face's bare `kernels`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

NAMES = ("pretrain", "finetune", "kernels", "cluster")


def probe() -> dict:
    def bare(name: str) -> dict | None:
        spec = importlib.util.find_spec(name)
        return None if spec is None else {"origin": spec.origin, "locations": list(spec.submodule_search_locations or [])}

    from transformers import PreTrainedModel  # noqa: F401
    import transformers.integrations.hub_kernels  # noqa: F401
    import avssl.cluster.train  # noqa: F401
    import avssl.finetune.heads  # noqa: F401
    import avssl.kernels.attention  # noqa: F401
    import avssl.pretrain.modeling  # noqa: F401

    return {
        "bare": {n: bare(n) for n in NAMES},
        "ours": {n: sys.modules["avssl." + n].__path__[0] for n in NAMES},
        "kernels_loaded_from": getattr(sys.modules.get("kernels"), "__file__", None),
        "pid": os.getpid(),
    }


def main() -> None:
    print(json.dumps(probe()), flush=True)
    if "--ray" in sys.argv:
        import ray

        # A new local instance unless RAY_ADDRESS names one: ray.init() alone attaches to whatever
        # instance `ray start` last recorded on this machine.
        local = {} if os.environ.get("RAY_ADDRESS") else {"address": "local", "num_cpus": 1, "include_dashboard": False}
        ray.init(log_to_driver=False, configure_logging=False, **local)
        print(json.dumps(ray.get(ray.remote(probe).remote())), flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
