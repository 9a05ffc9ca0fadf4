"""`ray.role_resources`: every rank also asks for `splitserve_<role>`, so instances land only on nodes that advertise
their role (the Helm chart's worker groups do); a cluster without those resources is refused with the fix."""

import pytest

from cluster_helpers import config, references, workload, write_checkpoint
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.launcher import rank_bundle


def test_rank_bundle():
    assert rank_bundle("prefill", False) == {"GPU": 1}
    assert rank_bundle("decode", True) == {"GPU": 1, "splitserve_decode": 1}


def test_local_ray_advertises_role_resources_and_instances_use_them(own_ray, tmp_path):
    ray = own_ray

    assert not ray.is_initialized()
    ckpt = write_checkpoint("llama", tmp_path / "llama", seed=71)
    prompts, params = workload(2, seed=3)
    with Cluster(config(ckpt, prefill={"tp": 2}, ray={"role_resources": True})) as cluster:
        assert ray.cluster_resources()["splitserve_prefill"] == 2 and ray.cluster_resources()["splitserve_decode"] == 1
        bundles = {inst.name: inst.placement_group.bundle_specs for inst in cluster.instances.values()}
        assert bundles == {"prefill-0": [{"GPU": 1, "splitserve_prefill": 1}] * 2,
                           "decode-0": [{"GPU": 1, "splitserve_decode": 1}]}
        outputs = cluster.generate(prompts, params, timeout=120)
    assert [o.token_ids for o in outputs] == references(ckpt, prompts, params)
    assert not ray.is_initialized()  # the launcher stopped the Ray it started


def test_cluster_without_role_resources_is_refused(own_ray, tmp_path):
    ray = own_ray

    ckpt = write_checkpoint("llama", tmp_path / "llama", seed=71)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, namespace="splitserve-tests", log_to_driver=False)
    try:
        with pytest.raises(ValueError, match=r"needs 1 units of 'splitserve_prefill'.*ray start --resources"):
            Cluster(config(ckpt, ray={"role_resources": True}))
    finally:
        ray.shutdown()
