"""The committed stubs are what the .proto compiles to today; the client builds requests or refuses them here."""
import pytest

from splitserve.proto import generate
from splitserve.proto.client import build_request
from splitserve.proto.v1 import inference_pb2 as pb


def test_generated_stubs_are_not_stale(tmp_path):
    written = generate.generate(tmp_path)
    for out, new in zip(generate.OUTPUTS, written):
        committed = generate.HERE / out
        assert committed.read_bytes() == new.read_bytes(), (
            f"proto/{out} is stale: run `python -m splitserve.proto.generate` and commit the result")


def test_build_request_text_ids_and_defaults():
    req = build_request("hi", stream=True, max_tokens=3, stop=["x"])
    assert req.WhichOneof("prompt") == "text" and req.stream and req.sampling.max_tokens == 3
    assert not req.sampling.HasField("temperature")  # unset: the server's default (1.0)
    req = build_request([5, 6], stream=False, request_id="r1", temperature=0.0)
    assert list(req.token_ids.ids) == [5, 6] and req.request_id == "r1"
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0


def test_build_request_refuses_unknown_sampling_field():
    with pytest.raises(ValueError, match="sampling: .*max_token"):
        build_request("hi", stream=True, max_token=3)


def test_finish_reasons_cover_the_enum():
    from splitserve.proto.client import FINISH_REASONS

    assert set(FINISH_REASONS) == set(pb.FinishReason.values())
