"""Checks of what a client sends: a Generate request's bytes, prompt and sampling options against the model,
with errors that name the offending field (`prompt.text`, `sampling.top_p`, ...) for INVALID_ARGUMENT."""
from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from splitserve.proto.v1 import inference_pb2 as pb
from splitserve.workers.sampling_params import SamplingParams

MAX_REQUEST_ID_LEN = 256
DEFAULT_MAX_TOKENS = SamplingParams().max_tokens


class InvalidArgument(ValueError):
    """A client-supplied field is invalid; the message starts with the field's path."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _wire_twin():
    """GenerateRequest with every string field as bytes: parses anything the real type would reject for invalid
    UTF-8, so the offending field can be named."""
    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "splitserve/proto/v1/inference_wire.proto"
    fdp.package = "splitserve.v1.wire"
    fdp.ClearField("service")
    for msg in fdp.message_type:
        for f in msg.field:
            if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            if f.type_name.startswith(".splitserve.v1."):
                f.type_name = ".splitserve.v1.wire." + f.type_name.rsplit(".", 1)[1]
    for enum in fdp.enum_type:  # keep enum value names unique in the twin's package
        for value in enum.value:
            value.name = "WIRE_" + value.name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("splitserve.v1.wire.GenerateRequest"))


_WireGenerateRequest = _wire_twin()


def _find_bad_utf8(msg, prefix: str = "") -> str | None:
    for field, value in msg.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == field.TYPE_BYTES:
            values = value if field.is_repeated else [value]
            for i, v in enumerate(values):
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{path}[{i}]" if field.is_repeated else path
        elif field.type == field.TYPE_MESSAGE:
            items = enumerate(value) if field.is_repeated else [(None, value)]
            for i, item in items:
                found = _find_bad_utf8(item, f"{path}." if i is None else f"{path}[{i}].")
                if found:
                    return found
    return None


@dataclass
class Malformed:
    """Stands in for a request the protobuf parser rejected; the handler answers INVALID_ARGUMENT."""

    error: str


def parse_generate_request(data: bytes) -> pb.GenerateRequest | Malformed:
    """The gRPC deserializer of Generate: never raises, so a malformed message is answered INVALID_ARGUMENT
    (naming a field that is not UTF-8) instead of INTERNAL."""
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError:
        pass
    try:
        field = _find_bad_utf8(_WireGenerateRequest.FromString(data))
    except Exception:  # a deserializer that raises makes gRPC answer INTERNAL; never let it
        field = None
    if field is not None:
        field = {"text": "prompt.text"}.get(field, field.replace("messages.messages", "prompt.messages", 1))
        return Malformed(f"{field}: is not valid UTF-8")
    return Malformed("request: is not a valid GenerateRequest message")


def sampling_from_proto(p: pb.SamplingParams, *, vocab_size: int, default_max_tokens: int) -> SamplingParams:
    """SamplingParams from the wire (unset optional fields take their defaults); errors name `sampling.<field>`."""
    for i, t in enumerate(p.stop_token_ids):
        if t >= vocab_size:
            raise InvalidArgument(f"sampling.stop_token_ids[{i}]", f"{t} is outside the vocabulary (size {vocab_size})")
    for i, s in enumerate(p.stop):
        if not s:
            raise InvalidArgument(f"sampling.stop[{i}]", "must not be empty")
    if p.HasField("max_tokens") and p.max_tokens == 0:
        raise InvalidArgument("sampling.max_tokens", "must be >= 1, got 0")
    kwargs = dict(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else default_max_tokens,
        min_tokens=p.min_tokens,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos,
        seed=p.seed if p.HasField("seed") else None, include_stop_str_in_output=p.include_stop_str_in_output)
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as e:
        text = str(e)
        name = text.split(" ", 1)[0].rstrip(":")
        if name in kwargs:  # the dataclass's messages start with the field name
            raise InvalidArgument(f"sampling.{name}", text[len(name):].lstrip(": ")) from None
        raise InvalidArgument("sampling", text) from None


def _chat_ids(chat: pb.ChatMessages, cluster) -> list[int]:
    """A conversation's token ids through the model's chat template; errors name `prompt.messages[...]`."""
    if cluster.chat_template is None:
        raise InvalidArgument("prompt.messages", "this model has no chat template; send prompt.text or "
                                                 "prompt.token_ids")
    try:
        ids = cluster.encode([{"role": m.role, "content": m.content} for m in chat.messages])
    except ValueError as e:  # "messages[1].role: must be ..." / "messages: ..."
        field, _, reason = str(e).partition(": ")
        raise InvalidArgument("prompt." + field, reason) from None
    if not ids:
        raise InvalidArgument("prompt.messages", "renders to no tokens")
    return ids


def validate_generate(request: pb.GenerateRequest, cluster) -> tuple[list[int], SamplingParams]:
    """The prompt's token ids and the sampling parameters of a Generate call on `cluster`, checked against its
    vocabulary and context; InvalidArgument names the field at fault."""
    vocab = cluster.model_config.vocab_size
    which = request.WhichOneof("prompt")
    if which is None:
        raise InvalidArgument("prompt", "set text, token_ids or messages")
    if which == "messages":
        ids = _chat_ids(request.messages, cluster)
    elif which == "text":
        if not request.text:
            raise InvalidArgument("prompt.text", "must not be empty")
        if cluster.tokenizer is None:
            raise InvalidArgument("prompt.text", "this model has no tokenizer; send prompt.token_ids")
        limit = cluster.config.max_prompt_bytes
        if len(request.text) * 4 > limit and (size := len(request.text.encode("utf-8", "surrogatepass"))) > limit:
            raise InvalidArgument("prompt.text", f"{size} bytes exceed max_prompt_bytes ({limit})")
        ids = cluster.encode(request.text)
        if not ids:
            raise InvalidArgument("prompt.text", "encodes to no tokens")
    else:
        ids = list(request.token_ids.ids)
        if not ids:
            raise InvalidArgument("prompt.token_ids", "must not be empty")
        for i, t in enumerate(ids):
            if t >= vocab:
                raise InvalidArgument(f"prompt.token_ids[{i}]", f"{t} is outside the vocabulary (size {vocab})")
    context_len = cluster.max_model_len
    if len(ids) >= context_len:
        raise InvalidArgument("prompt", f"{len(ids)} tokens leave no room for output in the context "
                                        f"({context_len} tokens)")
    params = sampling_from_proto(request.sampling, vocab_size=vocab,
                                 default_max_tokens=min(DEFAULT_MAX_TOKENS, context_len - len(ids)))
    if len(ids) + params.max_tokens > context_len:
        raise InvalidArgument("sampling.max_tokens", f"prompt ({len(ids)} tokens) + max_tokens "
                                                     f"({params.max_tokens}) exceeds the context ({context_len})")
    try:
        params.check_for_model(vocab, cluster.model_config.eos_token_ids)
    except ValueError as e:  # "stop_token_ids: ..."
        raise InvalidArgument(f"sampling.{str(e).split(':')[0]}", str(e).split(": ", 1)[1]) from None
    if len(request.request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidArgument("request_id", f"longer than {MAX_REQUEST_ID_LEN} characters")
    return ids, params
