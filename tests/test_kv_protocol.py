"""The transfer protocol's pure parts: one step's orders for odd layout pairs, and the decode side's reservations
and flags (PENDING -> RECEIVING -> DONE with the first token | FAILED; PENDING -> CANCELLED, drained once no link is
still receiving)."""
import pytest

from splitserve.comm.kv_plan import DecodeTarget, PrefillLayout, links_needed_sp, sp_block_owners, transfer_orders
from splitserve.comm.kv_reservations import (Reservation, Reservations, TransferState, done_value, parse_flag,
                                             transfer_key)


class FakeStore:
    """The subset of torch.distributed.Store the reservations use, in a dict."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def multi_set(self, keys, values):
        for k, v in zip(keys, values):
            self.set(k, v)

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def multi_get(self, keys):
        return [self.data[k] for k in keys]

    def compare_set(self, key, expected, desired):
        if self.data.get(key) == expected.encode():
            self.data[key] = desired.encode()
        return self.data[key]

    def delete_key(self, key):
        return self.data.pop(key, None) is not None


@pytest.mark.parametrize("cached", [0, 1, 5], ids=["full", "delta1", "delta5"])
@pytest.mark.parametrize("kv_heads, p_tp, p_sp, d_tp", [(4, 2, 1, 1), (4, 1, 1, 4), (2, 4, 1, 2), (8, 2, 2, 4),
                                                         (1, 2, 3, 2), (3, 1, 2, 3)])
def test_orders_cover_every_missing_block_and_head_exactly_once(kv_heads, p_tp, p_sp, d_tp, cached):
    """With `cached` blocks already on the decode side (its prefix cache), exactly the others move."""
    block_size, tokens = 4, 4 * 2 * p_sp * 3 - 1  # a partial last block
    layout = PrefillLayout("p", p_tp, p_sp, kv_heads, block_size)
    num_blocks = -(-tokens // block_size)
    src = [100 + i for i in range(num_blocks + 2)]  # longer than needed: only the used prefix moves
    target = DecodeTarget("d", d_tp, tuple(200 + i for i in range(num_blocks)), transfer_id=7, cached_blocks=cached)
    orders = transfer_orders(layout, tokens, src, target)
    # Every link still gets its order (the decode side waits for one completion per link).
    assert {(o.link.prefill_rank, o.link.decode_rank) for o in orders} == links_needed_sp(kv_heads, p_tp, d_tp, p_sp)
    owners = sp_block_owners(tokens, block_size, p_sp)
    covered = {}
    for o in orders:
        assert o.transfer_id == 7 and o.link.prefill_instance == "p" and o.link.decode_instance == "d"
        sp_rank = o.link.prefill_rank // p_tp
        for s, d in zip(o.src_blocks, o.dst_blocks):
            assert s - 100 == d - 200 and owners[d - 200] == sp_rank  # block i to block i, pushed by its owner
            assert d - 200 >= cached, "a block the decode side holds was sent"
            for h in o.slices:
                for k in range(h.num_heads):
                    cell = (d, o.link.decode_rank, h.dst_head + k)
                    assert cell not in covered, f"{cell} sent twice"
                    covered[cell] = o.link.prefill_rank
    heads_per_decode_rank = max(kv_heads // d_tp, 1)
    assert len(covered) == (num_blocks - cached) * d_tp * heads_per_decode_rank


def test_flags_round_trip():
    assert parse_flag(done_value(42, False).encode()) == (TransferState.DONE, "42 0")
    assert parse_flag(done_value(-1, False).encode()) == (TransferState.DONE, "")
    assert parse_flag(b"failed: link broken: peer gone") == (TransferState.FAILED, "link broken: peer gone")
    assert parse_flag(b"cancelled") == (TransferState.CANCELLED, "")


def _reserve(res: Reservations, rid="r", links=((0, 0), (1, 0))):
    return res.open(Reservation(rid, 1, [1, 2, 3], None, []), links)


def test_ready_once_every_link_is_done_with_the_first_token_from_rank_0():
    store = FakeStore()
    res = Reservations(store)
    tid = _reserve(res)
    store.set(transfer_key(tid, 0, 0), done_value(9, False))
    assert res.check().ready == [] and len(res) == 1  # the other link is still pending
    store.set(transfer_key(tid, 0, 1), "receiving")
    assert res.check().ready == []
    store.set(transfer_key(tid, 0, 1), done_value(-1, False))
    result = res.check()
    assert [(r.request_id, token) for r, token in result.ready] == [("r", 9)]
    assert len(res) == 0 and not store.data  # flags are deleted once decided


def test_finished_or_failed_first_tokens_release_and_a_missing_token_fails():
    store = FakeStore()
    res = Reservations(store)
    ok, done, failed, missing = (_reserve(res, name) for name in ("ok", "done", "failed", "missing"))
    for tid, token, finished in ((ok, 8, False), (done, 8, True), (failed, -1, True), (missing, -1, False)):
        store.set(transfer_key(tid, 0, 0), done_value(token, finished))
        store.set(transfer_key(tid, 0, 1), done_value(-1, False))
    result = res.check()
    assert [(r.request_id, token) for r, token in result.ready] == [("ok", 8)]
    assert [r.request_id for r in result.finished] == ["done", "failed"]
    assert [r.request_id for r, _ in result.failed] == ["missing"]


def test_failure_of_any_link_fails_the_reservation():
    store = FakeStore()
    res = Reservations(store)
    tid = _reserve(res)
    store.set(transfer_key(tid, 0, 0), done_value(3, False))
    store.set(transfer_key(tid, 0, 1), "failed: link timed out")
    result = res.check()
    assert [(r.request_id, why) for r, why in result.failed] == [("r", "link timed out")]
    assert len(res) == 0


def test_cancel_waits_for_links_still_receiving():
    store = FakeStore()
    res = Reservations(store)
    tid = _reserve(res)
    assert res.find("r", 1) == tid and res.find("r", 2) is None and res.holds("r")
    store.set(transfer_key(tid, 0, 1), "receiving")  # one sender got in before the cancel
    res.cancel(tid)
    assert store.data[transfer_key(tid, 0, 0)] == b"cancelled"  # no sender may start writing now
    assert res.check().drained == [] and res.holds("r")
    store.set(transfer_key(tid, 0, 1), done_value(-1, False))
    assert [r.request_id for r in res.check().drained] == ["r"]
    assert not res.holds("r") and not store.data


def test_shm_writer_past_its_deadline_writes_nothing():
    """The fence of the shared-memory transport: a sender that resumes after the transfer deadline starts no
    copy, so blocks the decode side freed after its (later) deadline cannot be touched."""
    import time

    import torch

    from splitserve.comm.kv_plan import HeadSlice, LinkId, TransferOrder
    from splitserve.comm.kv_transfer import KVSender

    src = [torch.randn(2, 4, 2, 1, 3) for _ in range(2)]
    dst = [torch.zeros(2, 4, 2, 1, 3) for _ in range(2)]
    link = LinkId("p", 0, "d", 0)
    sender = KVSender(src, {}, "shm", 5.0, lambda _: dst)
    order = TransferOrder(1, link, [0, 2], [1, 3], [HeadSlice(0, 0, 0, 0, 1)])

    def job(deadline):
        return {"order": order, "deadline": deadline, "go": True, "error": None, "works": [], "stall": False}

    late = job(time.monotonic() - 0.1)
    sender._guard(late, sender._send_layer, late, 0)
    assert "deadline passed" in late["error"] and not dst[0].any()
    on_time = job(time.monotonic() + 5)
    sender._guard(on_time, sender._send_layer, on_time, 0)
    assert on_time["error"] is None
    assert torch.equal(dst[0][:, [1, 3]], src[0][:, [0, 2]]) and not dst[0][:, [0, 2]].any()
