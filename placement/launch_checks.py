"""The model-shape checks a layout must pass before an instance of it launches, in one place for `splitserve plan`,
`placement: auto` and `splitserve profile`. Backend-specific checks (DeepSpeed AutoTP, pipeline stages on the
transformers backend) stay with the code that knows the backend (cluster/auto_placement.py)."""
from __future__ import annotations

from splitserve.placement.parallel import Parallel
from splitserve.placement.specs import ModelSpec


def launch_shape_problem(model: ModelSpec, par: Parallel) -> str | None:
    """Why an instance of layout `par` cannot split `model` (TP over heads, MLP width and KV heads; more stages than
    layers), prefixed by the field at fault, or None."""
    problem = model.tp_problem(par.tp)
    if problem:
        return f"tp: {problem}"
    problem = model.pp_problem(par.pp)
    if problem:
        return f"pp: {problem}"
    return None
