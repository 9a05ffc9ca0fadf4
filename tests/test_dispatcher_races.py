"""Two failure reports about one request, in either order: the dispatcher moves it once, dispatches it once, and
ignores what its abandoned attempt still sends; an instance's relaunch never depends on moving its requests
having gone well. Fake instance leaders (no Ray processes), so each interleaving is forced exactly."""
import asyncio
import dataclasses
from types import SimpleNamespace

from ray.exceptions import RayActorError

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.dispatcher import Dispatcher
from splitserve.cluster.fleet import Fleet, InstanceState
from splitserve.cluster.request import Request, RequestState
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.stop import TextStream

KV_FAILED = "KV transfer failed: link/prefill-0/0/decode-0/0: connection closed by peer"


class FakeLeader:
    """Answers `lead.remote(method, ...)` with a resolved future; a dead one fails every call as Ray would."""

    def __init__(self, name: str, role: str):
        self.name, self.spec = name, SimpleNamespace(role=role, tp=1, sp=1, pp=1, model_dir="tiny", dtype="float32")
        self.leader, self.actors, self.calls, self.dead = SimpleNamespace(lead=self), [], [], False

    def remote(self, method: str, *args):
        self.calls.append((method, *args))
        future = asyncio.get_running_loop().create_future()
        if self.dead:
            future.set_exception(RayActorError())
        elif method == "reserve":
            future.set_result(SimpleNamespace(instance=self.name))
        else:
            future.set_result(None)
        return future

    def submits(self, request_id: str) -> list[int]:
        return [c[2] for c in self.calls if c[0] == "submit" and c[1] == request_id]


class FakeLauncher:
    def __init__(self):
        self.replaced: dict[str, FakeLeader] = {}

    def replace(self, name: str) -> FakeLeader:
        self.replaced[name] = FakeLeader(name, name.split("-")[0])
        return self.replaced[name]

    def stop_instance(self, name: str) -> None:
        pass


def _config() -> ClusterConfig:
    config = ClusterConfig()
    return dataclasses.replace(config, fault_tolerance=dataclasses.replace(config.fault_tolerance,
                                                                           restart_backoff_s=0.01))


def _request(request_id: str) -> Request:
    params = SamplingParams(max_tokens=4)
    return Request(request_id, [5, 6, 7], params, params, TextStream.for_params(params, None), frozenset({2}),
                   asyncio.Queue())


async def _until(check, what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _fleet(*requests):
    """prefill-0 -> decode-0 with every request submitted to prefill-0 (its first attempt)."""
    instances = {"prefill-0": FakeLeader("prefill-0", "prefill"), "decode-0": FakeLeader("decode-0", "decode")}
    launcher = FakeLauncher()
    dispatcher = Dispatcher(instances, _config(), asyncio.get_running_loop(), launcher)
    dispatcher.fleet.running = True  # no pollers or pings: events are fed by hand
    dispatcher.router.report("decode-0", {"free_blocks": 100})
    first = instances["prefill-0"]
    for req in requests:
        dispatcher.add(req)
    await _until(lambda: all(first.submits(r.request_id) for r in requests), "the first submits")
    return dispatcher, first, launcher


def test_a_retry_then_the_instance_death_moves_each_request_once():
    """The CI failure: a KV transfer fails (the request goes back to dispatch), then the fleet reports the prefill
    instance dead before that dispatch ran. The retried request must not be migrated too, the other one must be,
    and the instance must be relaunched."""
    async def scenario():
        retried, other = _request("retried"), _request("other")
        dispatcher, first, launcher = await _fleet(retried, other)
        dispatcher._handle("prefill-0", first, ("failed", "retried", retried.attempt, KV_FAILED))
        assert retried.state is RequestState.QUEUED
        first.dead = True
        dispatcher.fleet.died("prefill-0", "its leader's process died", first)  # raised here before the fix
        assert (retried.state, other.state) == (RequestState.QUEUED, RequestState.MIGRATING)
        # A stale event of the abandoned attempt is ignored (it used to move a queued request to decoding).
        dispatcher._handle("prefill-0", first, ("kv_ready", "retried", 1, 0, 11))
        assert retried.state is RequestState.QUEUED and retried.token_ids == []
        await _until(lambda: "prefill-0" in launcher.replaced, "the relaunch")
        again = launcher.replaced["prefill-0"]
        await _until(lambda: again.submits("retried") and again.submits("other"), "the second submits")
        await asyncio.sleep(0.1)  # a second dispatch, were there one, would submit again by now
        assert again.submits("retried") == [2] and again.submits("other") == [2]
        assert (retried.retries, retried.migrations, other.retries, other.migrations) == (1, 0, 0, 1)
        assert dispatcher.migrations == {"instance_died": 1}
        assert dispatcher.fleet.records["prefill-0"].state is InstanceState.SERVING
        # The second attempt finishes normally.
        dispatcher._handle("decode-0", dispatcher.instances["decode-0"],
                           ("tokens", [("retried", 2, 0, 9, False, None, None), ("retried", 2, 1, 2, True, "stop", 2)]))
        assert retried.state is RequestState.FINISHED and retried.token_ids == [9, 2]

    asyncio.run(scenario())


def test_a_failed_call_and_the_fleet_report_the_same_death_once():
    """A submit to a dead leader makes the fleet report the death (which moves the request) and then raises to the
    submitting dispatch, which used to move it a second time: two migrations counted, two dispatches."""
    async def scenario():
        instances = {"prefill-0": FakeLeader("prefill-0", "prefill"), "decode-0": FakeLeader("decode-0", "decode")}
        instances["prefill-0"].dead = True
        launcher = FakeLauncher()
        dispatcher = Dispatcher(instances, _config(), asyncio.get_running_loop(), launcher)
        dispatcher.fleet.running = True
        dispatcher.router.report("decode-0", {"free_blocks": 100})
        req = _request("r")
        dispatcher.add(req)
        await _until(lambda: "prefill-0" in launcher.replaced, "the relaunch")
        again = launcher.replaced["prefill-0"]
        await _until(lambda: again.submits("r"), "the submit to the relaunched instance")
        await asyncio.sleep(0.1)
        assert again.submits("r") == [2] and req.migrations == 1 and dispatcher.migrations == {"instance_died": 1}
        assert req.state is RequestState.PREFILLING

    asyncio.run(scenario())


def test_an_instance_is_relaunched_even_if_moving_its_requests_fails():
    async def scenario():
        relaunched = []

        def on_dead(name, error):
            raise RuntimeError("moving a request failed")

        instances = {"decode-0": FakeLeader("decode-0", "decode")}
        config = _config().fault_tolerance
        fleet = Fleet(instances, config, asyncio.get_running_loop(),
                      lambda name: relaunched.append(name) or FakeLeader(name, "decode"), lambda name: None,
                      on_dead, lambda name: None)
        fleet.running = True
        try:
            fleet.died("decode-0", "its leader's process died")
        except RuntimeError:
            pass  # the caller sees the error; what matters is the relaunch
        await _until(lambda: fleet.serving("decode-0"), "the relaunch")
        assert relaunched == ["decode-0"] and fleet.records["decode-0"].restarts == 1

    asyncio.run(scenario())
