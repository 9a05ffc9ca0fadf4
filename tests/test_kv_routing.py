"""KV-aware routing: the router mirrors each instance's prefix cache from its stored/evicted events and scores
prefill by tokens to compute + pending, decode by free blocks + blocks it holds; least_loaded ignores the cache."""
import pytest

from splitserve.cluster.config import config_from_dict
from splitserve.cluster.router import Router
from splitserve.workers.block_manager import BlockManager, block_hashes

BS = 4


def _router(policy="kv_aware", weight=1.0):
    r = Router(["p0", "p1"], ["d0", "d1"], [], policy, weight)
    for name in ("d0", "d1"):
        r.report(name, {"free_blocks": 20})
    return r


def _held(router, name, tokens):
    router.cache_events(name, [(True, h) for h in block_hashes(tokens, BS)])


def test_the_mirror_follows_a_block_managers_events():
    bm, router = BlockManager(3, BS, prefix_caching=True), _router()
    bm.record_events = True
    prompt = list(range(12))
    bm.allocate("a", 12)
    bm.commit("a", prompt)
    bm.free("a")
    router.cache_events("p1", bm.take_events())
    assert router.overlap("p1", block_hashes(prompt + [1], BS)) == 3
    bm.allocate("b", 4)  # evicts the least recently used block: the prompt's last
    router.cache_events("p1", bm.take_events())
    assert router.overlap("p1", block_hashes(prompt, BS)) == 2


def test_overlap_is_a_prefix_match():
    router = _router()
    _held(router, "p0", list(range(8)))
    hashes = block_hashes([0, 1, 2, 3, 9, 9, 9, 9, 4, 5, 6, 7], BS)
    assert router.overlap("p0", hashes) == 1  # block 2 of another history is not a prefix hit


def test_prefill_weighs_cached_tokens_against_pending_tokens():
    router = _router()
    prompt = list(range(40))
    _held(router, "p1", prompt[:32])
    hashes = block_hashes(prompt, BS)
    assert router.pick_prefill(hashes, BS) == "p1"  # 8 tokens to compute there, 40 on p0
    router.prompt_started("p1", 30)
    assert router.pick_prefill(hashes, BS) == "p1"  # 30 + 8 < 40
    router.prompt_started("p1", 10)
    assert router.pick_prefill(hashes, BS) == "p0"  # 40 + 8 > 40: load wins
    assert _router("least_loaded").pick_prefill(hashes, BS) == "p0"


def test_decode_weighs_held_blocks_against_free_blocks():
    router = _router()
    prompt = list(range(40))
    _held(router, "d1", prompt)
    hashes = block_hashes(prompt, BS)
    assert router.decode_order(hashes) == ["d1", "d0"]
    router.report("d1", {"free_blocks": 9})  # 9 free + 10 held < 20 free
    assert router.decode_order(hashes) == ["d0", "d1"]
    router.report("d1", {"free_blocks": 11})
    assert router.decode_order(hashes) == ["d1", "d0"]
    assert _router("least_loaded").decode_order(hashes) == ["d0", "d1"]


def test_a_relaunched_instance_starts_with_an_empty_mirror():
    router = _router()
    _held(router, "p1", list(range(8)))
    router.set_serving("p1", False)
    router.set_serving("p1", True)
    assert router.overlap("p1", block_hashes(list(range(8)), BS)) == 0


@pytest.mark.parametrize("routing, message", [
    ({"policy": "round_robin"}, "'routing.policy' must be one of ['kv_aware', 'least_loaded']"),
    ({"overlap_weight": -1}, "'routing.overlap_weight' must be a number >= 0"),
    ({"overlap_weight": "1"}, "'routing.overlap_weight' must be a number >= 0"),
    ({"weight": 1}, "unknown key 'routing.weight'"),
])
def test_routing_config_errors_name_the_field(routing, message):
    with pytest.raises(ValueError) as info:
        config_from_dict({"routing": routing})
    assert message in str(info.value)


def test_routing_defaults():
    cfg = config_from_dict({})
    assert (cfg.routing.policy, cfg.routing.overlap_weight, cfg.engine.prefix_caching) == ("kv_aware", 1.0, True)
