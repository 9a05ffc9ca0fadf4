"""Ray job submission against a real `ray start --head` on 127.0.0.1 with token authentication: a batch job
submitted through the job API equals transformers; a driver that attaches from outside (`--address`) gets an
actionable placement error and leaves the cluster running; where to attach is resolved from config, then
RAY_ADDRESS."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cluster_helpers import config, references, workload, write_checkpoint
from splitserve.cluster.launcher import resolve_address

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 300


@dataclass
class Head:
    gcs_address: str
    dashboard_url: str
    token: str
    env: dict
    process: subprocess.Popen

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_pids(sid: int) -> list[int]:
    """Processes of one session: `ray start` runs in its own, and every Ray process it starts stays in it."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # state, ppid, pgrp, session
                pids.append(int(entry.name))
    return pids


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` stops what it started; anything of its session still alive is killed."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while _session_pids(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session_pids(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def head():
    # Short path: Ray's unix socket paths under the temp dir must fit in 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="ssray-"))
    token = secrets.token_hex(32)
    gcs, dashboard, client, agent, dashboard_metrics, autoscaler_metrics = _free_ports(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               # fixed by default: another Ray on this machine may hold them
               DASHBOARD_METRIC_PORT=str(dashboard_metrics), AUTOSCALER_METRIC_PORT=str(autoscaler_metrics),
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")  # the job's `python` is this venv's
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--port", str(gcs), "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--num-cpus", "2", "--num-gpus", "2", "--object-store-memory", str(200 << 20), "--temp-dir", str(tmp),
           "--disable-usage-stats"]
    with (tmp / "ray-start.log").open("w") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        h = Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", token, env, process)
        _wait_for_jobs_api(h, tmp / "ray-start.log")
        yield h
    finally:
        _stop(process)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_jobs_api(h: Head, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if h.process.poll() is not None:
            pytest.fail(f"ray start exited with {h.process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            h.client().list_jobs()
            return
        except Exception as e:
            if time.monotonic() > deadline:
                pytest.fail(f"the job API did not come up within {START_TIMEOUT_S}s: {e}\n{log.read_text()[-4000:]}")
            time.sleep(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=61)


def test_resolve_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None
    assert resolve_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert resolve_address(None) == "127.0.0.1:6379"
    assert resolve_address("ray://10.0.0.1:10001") == "ray://10.0.0.1:10001"
    with pytest.raises(ValueError, match=r"ray.address: 'http://127.0.0.1:8265' is a dashboard"):
        resolve_address("http://127.0.0.1:8265")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ValueError, match=r"RAY_ADDRESS: .* is a dashboard \(job submission\) address"):
        resolve_address(None)


def test_cluster_requires_the_token(head, tmp_path):
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=30)
    assert exc.value.code == 401
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt_token_ids": [3, 4]}) + "\n")
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}  # no token
    proc = subprocess.run([sys.executable, "-m", "splitserve.cluster.batch", "--input", str(inp), "--output",
                           str(tmp_path / "out.jsonl"), "--address", head.gcs_address],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert f"could not authenticate to the Ray cluster at {head.gcs_address}" in proc.stderr, proc.stderr
    assert "RAY_AUTH_TOKEN" in proc.stderr and "`ray get-auth-token`" in proc.stderr, proc.stderr


def test_attached_driver_gets_placement_error_and_leaves_the_cluster_running(head, ckpt, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt_token_ids": [3, 4]}) + "\n")
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(config(ckpt, prefill={"tp": 2})))  # 3 ranks; the cluster has 2 GPUs
    proc = subprocess.run([sys.executable, "-m", "splitserve.cluster.batch", "--input", str(inp), "--output",
                           str(tmp_path / "out.jsonl"), "--config", str(cfg), "--address", head.gcs_address],
                          env=head.env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert "needs 3 GPUs but the Ray cluster has 2" in proc.stderr and "`ray status`" in proc.stderr, proc.stderr
    assert head.process.poll() is None
    head.client().list_jobs()  # disconnecting did not stop it


def test_batch_job_matches_transformers(head, ckpt, tmp_path):
    prompts, params = workload(6, seed=7)
    expected = references(ckpt, prompts, params)
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "prompts.jsonl").write_text("".join(
        json.dumps({"id": i, "prompt_token_ids": p, "sampling": {"temperature": 0.0, "max_tokens": sp.max_tokens,
                                                                  "ignore_eos": True}}) + "\n"
        for i, (p, sp) in enumerate(zip(prompts, params))))
    cfg = config(ckpt, ray={"address": "auto", "placement_timeout_s": 120})
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "results.jsonl"  # absolute: the working directory is a per-job copy
    client = head.client()
    job = client.submit_job(
        entrypoint=f"python -m splitserve.cluster.batch --input prompts.jsonl --config config.yaml --output {out}",
        runtime_env={"working_dir": str(workdir)})

    status = _wait_for_job(client, job)

    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "batch: 6 done, 0 failed, 0 skipped" in logs, logs[-6000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(6))
    for r in records:
        assert r["error"] is None and r["token_ids"] == expected[r["id"]], r


def _wait_for_job(client, job: str) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        status = str(client.get_job_status(job).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"job {job} still {status} after {JOB_TIMEOUT_S}s:\n{client.get_job_logs(job)[-6000:]}")
        time.sleep(1)


def test_server_runs_as_a_ray_job(head, ckpt, tmp_path):
    """`splitserve serve --address auto` submitted as a job: it serves gRPC on 127.0.0.1, and stopping the job
    (SIGTERM) drains the server, which exits cleanly."""
    from splitserve.proto.client import Client

    prompts, params = workload(2, seed=9)
    expected = references(ckpt, prompts, params)
    workdir = tmp_path / "serve"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(config(ckpt, ray={"placement_timeout_s": 120})))
    (port,) = _free_ports(1)
    client = head.client()
    job = client.submit_job(
        entrypoint=f"splitserve serve --config config.yaml --address auto --port {port} --no-metrics",
        runtime_env={"working_dir": str(workdir)})
    try:
        with Client(f"127.0.0.1:{port}", timeout=120) as c:
            try:
                c.wait_ready(timeout=JOB_TIMEOUT_S)
            except TimeoutError:
                pytest.fail(f"server job not ready: {client.get_job_logs(job)[-6000:]}")
            for prompt, sp, ref in zip(prompts, params, expected):
                out = c.generate(prompt, max_tokens=sp.max_tokens, temperature=0.0, ignore_eos=True)
                assert out.token_ids == ref
    finally:
        client.stop_job(job)
    status = _wait_for_job(client, job)
    logs = client.get_job_logs(job)
    assert status == "STOPPED", logs[-6000:]
    assert "splitserve: stopped" in logs, logs[-6000:]
