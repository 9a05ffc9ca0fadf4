"""Incremental detokenizer on a byte-level BPE tokenizer trained in the test: multi-byte characters
split across tokens, deltas that add up to a full decode, a small decode window."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from splitserve.workers.detokenizer import IncrementalDetokenizer

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog. STOP here.",
          "你好世界你好世界", "naïve café", "ab 🙂🙂"] * 4
SPECIALS = ["<eos>", "<stop>"]


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def byte_level_map() -> dict[str, int]:
    """The byte-level pre-tokenizer's printable stand-in character for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tok: Tokenizer) -> dict[bytes, int]:
    """Raw bytes of every non-special token -> its id."""
    chars = byte_level_map()
    vocab = tok.get_vocab(with_added_tokens=False)
    return {bytes(chars[c] for c in piece): i for piece, i in vocab.items() if piece not in SPECIALS}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def longest_valid_prefix(data: bytes) -> str:
    for end in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError("invalid UTF-8 in the middle of test data")


def test_byte_map_matches_tokenizer(tok):
    table = token_bytes(tok)
    assert len(table) == tok.get_vocab_size() - len(SPECIALS)
    for data, i in list(table.items())[:300]:
        if all(b < 0x80 for b in data):
            assert tok.decode([i]) == data.decode("ascii")


def ends_inside_a_character(data: bytes) -> bool:
    """Whole characters followed by the first bytes of another, like b'a\xc3'."""
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError as err:
        return err.start > 0 and err.reason == "unexpected end of data"


def test_vocab_has_tokens_that_split_characters(tok):
    # BPE merges across character boundaries, e.g. 'a' + the first byte of 'ï'; the tests rely on it.
    assert any(ends_inside_a_character(d) for d in token_bytes(tok))


def segmentations(tok):
    """Strategy: a text and a random split of its bytes into vocabulary tokens (not the encoder's split)."""
    table = token_bytes(tok)
    longest = max(map(len, table))
    text = st.text(alphabet=st.sampled_from(list("ab ï你好世界🙂🎉é.\n")), min_size=1, max_size=24)

    @st.composite
    def split(draw):
        data = draw(text).encode("utf-8")
        ids, pos = [], 0
        while pos < len(data):
            options = [n for n in range(1, longest + 1) if data[pos:pos + n] in table]
            n = draw(st.sampled_from(options))
            ids.append(table[data[pos:pos + n]])
            pos += n
        return data, ids
    return split()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_deltas_are_the_longest_complete_prefix(tok, data):
    raw, ids = data.draw(segmentations(tok))
    prompt = tok.encode("hello 你").ids
    detok = IncrementalDetokenizer(tok, prompt)
    emitted, chunk = "", data.draw(st.integers(1, 3))
    seen = b""
    table = {i: d for d, i in token_bytes(tok).items()}
    for start in range(0, len(ids), chunk):
        step_ids = ids[start:start + chunk]
        delta = detok.step(step_ids)
        seen += b"".join(table[i] for i in step_ids)
        assert "\ufffd" not in delta
        emitted += delta
        # Everything complete is released at once; only a split character's bytes are held back.
        assert emitted == longest_valid_prefix(seen)
        assert detok.text == emitted
    assert emitted == raw.decode("utf-8") == tok.decode(ids)
    assert detok.flush() == ""


def test_split_character_is_released_when_complete(tok):
    table = token_bytes(tok)
    a_and_lead = table["aï".encode()[:2]]  # 'a' plus the first byte of 'ï'
    detok = IncrementalDetokenizer(tok, [])
    assert detok.step([a_and_lead]) == "a"
    assert detok.step([table[b"\xaf"]]) == "ï"
    emoji = "🎉".encode()
    assert [detok.step([table[emoji[i:i + 1]]]) for i in range(4)] == ["", "", "", "🎉"]
    assert detok.text == "aï🎉"


def test_flush_releases_incomplete_bytes_as_replacement(tok):
    table = token_bytes(tok)
    detok = IncrementalDetokenizer(tok, [])
    ids = [table[b"x"], table["🙂".encode()[:1]], table["🙂".encode()[1:2]]]
    assert detok.step(ids) == "x"
    assert detok.flush() == tok.decode(ids)[1:]
    assert detok.text == tok.decode(ids) and detok.text.endswith("\ufffd")


def test_special_tokens(tok):
    eos = tok.token_to_id("<eos>")
    ids = tok.encode("the fox").ids
    skip = IncrementalDetokenizer(tok, [])
    keep = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    for t in [*ids[:2], eos, *ids[2:]]:
        skip.step([t])
        keep.step([t])
    assert skip.text == "the fox"
    assert "<eos>" in keep.text and keep.text.replace("<eos>", "") == "the fox"


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call saw."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decodes_a_small_window_not_the_history(tok):
    text = "the quick brown fox jumps over the lazy dog 你好世界 🙂 " * 20
    ids = tok.encode(text).ids
    assert len(ids) > 300
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, tok.encode("a long prompt " * 50).ids)
    for t in ids:
        detok.step([t])
    assert detok.text == text
    assert max(counting.sizes) <= 10, max(counting.sizes)
    assert len(counting.sizes) <= 2 * len(ids)
