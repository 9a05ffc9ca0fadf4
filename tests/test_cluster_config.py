"""Cluster configuration: the embedded default, YAML files, and errors that name the offending key."""
import pytest

from splitserve.cluster.config import DEFAULT_YAML, config_from_dict, load_config


def test_embedded_default():
    cfg = load_config()
    assert (cfg.model, cfg.dtype, cfg.device) == ("smollm2-135m", "float32", "auto")
    assert (cfg.prefill.instances, cfg.prefill.tp, cfg.decode.instances, cfg.decode.tp) == (1, 1, 1, 1)
    assert cfg.colocated.instances == 0 and cfg.num_devices == 2 and cfg.ray.address is None
    assert "prefill: {instances: 1, tp: 1, sp: 1}" in DEFAULT_YAML


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: small\nprefill: {instances: 2, tp: 2}\ndecode: {tp: 4}\nkv_transfer: {transport: shm}\n")
    cfg = load_config(path)
    assert cfg.num_devices == 2 * 2 + 4 and cfg.kv_transfer.transport == "shm"


@pytest.mark.parametrize("data,message", [
    ({"prefil": {}}, "unknown key 'prefil'"),
    ({"decode": {"tpp": 2}}, "unknown key 'decode.tpp'"),
    ({"engine": {"block_size": 0}}, "'engine.block_size' must be an integer >= 1"),
    ({"prefill": {"tp": "2"}}, "'prefill.tp' must be an integer >= 1"),
    ({"dtype": "float64"}, "'dtype' must be one of"),
    ({"kv_transfer": {"timeout_s": -1}}, "'kv_transfer.timeout_s' must be a positive number"),
    ({"kv_transfer": {"mode": "eager"}}, "'kv_transfer.mode' must be one of"),
    ({"prefill": {"instances": 0}}, "'prefill.instances' and 'decode.instances' must both be > 0"),
    ({"prefill": {"instances": 0}, "decode": {"instances": 0}}, "no instances"),
    ({"decode": {"pp": 0}}, "'decode.pp' must be an integer >= 1"),
    ({"engine": {"gpu_memory_fraction": 1.5}}, "'engine.gpu_memory_fraction' must be <= 1"),
    ({"prefill": [1, 2]}, "'prefill' must be a mapping"),
    ({"engine": {"prefix_caching": "on"}}, "'engine.prefix_caching' must be true or false"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ValueError) as info:
        config_from_dict(data)
    assert message in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config: no such file"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill: {tp: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)


def test_tp_norm_methods_match_the_comm_layer():
    from splitserve.cluster.config import TP_NORM_METHODS
    from splitserve.comm.fused_norm import METHODS

    assert TP_NORM_METHODS == METHODS
    with pytest.raises(ValueError, match="'engine.tp_norm_method' must be one of"):
        config_from_dict({"engine": {"tp_norm_method": "nccl"}})
    with pytest.raises(ValueError, match="'engine.overlap_min_tokens' must be an integer >= 2"):
        config_from_dict({"engine": {"overlap_min_tokens": 1}})
