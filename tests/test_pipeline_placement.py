"""The launcher places each pipeline stage on the node the plan gives it (placement.instances[].stages[].node, the
i-th GPU node by address); a plan made for a larger cluster is not applied; a plan whose stages disagree with pp is
refused; so are, before anything starts, more stages than layers and stages of a transformers-backend model."""
import pytest

from splitserve.cluster.config import config_from_dict
from splitserve.cluster.launcher import Launcher


class FakeRay:
    def nodes(self):
        return [{"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"GPU": 8}},
                {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"GPU": 8}},
                {"Alive": True, "NodeManagerAddress": "10.0.0.9", "Resources": {"CPU": 4}},  # no GPUs: not counted
                {"Alive": False, "NodeManagerAddress": "10.0.0.0", "Resources": {"GPU": 8}}]


def _launcher(stages, pp=2):
    plan = {"instances": [{"role": "decode", "index": 0, "stages": stages}]}
    config = config_from_dict({"model": "tiny", "decode": {"pp": pp}, "placement": plan})
    return Launcher(config, "unused")


def test_stages_go_to_the_planned_nodes():
    launcher = _launcher([{"node": 1, "devices": [0]}, {"node": 0, "devices": [0]}])
    assert launcher.stage_nodes(FakeRay(), launcher.spec_for("decode", 0)) == ["10.0.0.2", "10.0.0.1"]
    assert launcher.stage_nodes(FakeRay(), launcher.spec_for("prefill", 0)) == [None]  # the plan says nothing


def test_a_plan_for_more_nodes_is_not_applied():
    launcher = _launcher([{"node": 0, "devices": [0]}, {"node": 2, "devices": [0]}])
    assert launcher.stage_nodes(FakeRay(), launcher.spec_for("decode", 0)) == [None, None]


def test_stages_that_disagree_with_pp_are_refused():
    launcher = _launcher([{"node": 0, "devices": [0]}], pp=2)
    with pytest.raises(ValueError, match=r"placement.instances: decode-0 has stages .* expected 2 stages \(decode.pp\)"):
        launcher.stage_nodes(FakeRay(), launcher.spec_for("decode", 0))


@pytest.mark.parametrize("kind, sections, message", [
    ("llama", {"decode": {"pp": 3}}, r"decode.pp: 3 pipeline stages cannot split the model's 2 layers"),
    ("opt", {"prefill": {"pp": 2}}, r"prefill.pp: pipeline stages are not available with the transformers backend"),
])
def test_layouts_the_model_cannot_stage_are_refused_before_launch(tmp_path, kind, sections, message):
    from cluster_helpers import config, write_checkpoint
    from splitserve.cluster.cluster import Cluster

    with pytest.raises(ValueError, match=message):
        Cluster(config(write_checkpoint(kind, tmp_path, seed=3), **sections))
