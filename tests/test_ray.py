"""`edgelm validate --runner A --runner B --ray`: a device farm on a real local Ray cluster (a head and a
worker process, loopback only, one CPU each) with two loopback SSH boards validated at once."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys

import pytest
from conftest import free_port, start_sshd

from edgelm.cli import ray_flag_value
from tests.test_cli import run_cli

# not imported here: Ray reads its cluster token when it is first imported, after the fixture has set it
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed (edgelm[ray])")
ONNX = "model.int8_dynamic.onnx"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """``ray start --head`` and one ``ray start --address`` worker node on 127.0.0.1; the address."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("ray")
    # Ray 2.5x authenticates every process of a cluster with a token: one for this cluster and this driver
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    env = dict(os.environ)
    ray_cli = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    head = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard",
            "false", "--temp-dir", str(tmp), *common]  # fmt: skip
    subprocess.run(head, check=True, capture_output=True, env=env, timeout=120)
    address = f"127.0.0.1:{port}"
    worker = [ray_cli, "start", "--address", address, "--node-ip-address", "127.0.0.1", *common]
    subprocess.run(worker, check=True, capture_output=True, env=env, timeout=120)
    yield address
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env, timeout=120)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def two_boards(tmp_path_factory):
    """Two loopback SSH boards that accept the same key: ``(targets, key, known_hosts)``."""
    a = start_sshd(tmp_path_factory.mktemp("board-a"))
    b = start_sshd(tmp_path_factory.mktemp("board-b"))
    shutil.copy(a[1].with_name("authorized_keys"), b[1].with_name("authorized_keys"))
    known = a[2].with_name("both_known_hosts")
    known.write_text(a[2].read_text() + b[2].read_text())
    yield [a[0], b[0]], a[1], known
    for board in (a, b):
        board[4].terminate()
        board[4].wait(timeout=10)


def test_ray_flag_alone_means_a_local_instance():
    assert ray_flag_value(["validate", "b", "--ray"]) == ["validate", "b", "--ray=local"]
    assert ray_flag_value(["validate", "b", "--ray", "--runner", "x"]) == [
        "validate",
        "b",
        "--ray=local",
        "--runner",
        "x",
    ]
    assert ray_flag_value(["validate", "b", "--ray", "auto"]) == ["validate", "b", "--ray", "auto"]


def test_two_boards_validated_concurrently_on_the_cluster(pixel8_bundle, two_boards, ray_cluster, tmp_path):
    bundle = tmp_path / "pixel8"
    shutil.copytree(pixel8_bundle, bundle)
    targets, key, known = two_boards
    code, output = run_cli(
        "validate", str(bundle), "--runner", targets[0], "--runner", targets[1], "--key", str(key),
        "--known-hosts", str(known), "--artifact", ONNX, "--warmup", "1", "--runs", "3", "--ray", ray_cluster,
    )  # fmt: skip
    assert code == 0, output
    doc = json.loads((bundle / "validation.json").read_text())
    names = targets
    recs = [doc["runners"][n] for n in names]
    for r in recs:
        assert r["passed"] and r["artifacts"][ONNX]["status"] == "passed", r
    a, b = (r["placement"] for r in recs)
    # two actors, one per node (one CPU each), and their runs overlap in time: concurrent, not one after another
    assert a["pid"] != b["pid"]
    assert a["started_unix"] < b["finished_unix"] and b["started_unix"] < a["finished_unix"]
    assert output.count("ran on node") == 2
    report = (bundle / "report.md").read_text()
    assert all(f"| {ONNX} | {n} |" in report for n in names)


def test_a_runner_that_fails_is_reported_and_the_others_finish(pixel8_bundle, two_boards, ray_cluster, tmp_path):
    bundle = tmp_path / "pixel8"
    shutil.copytree(pixel8_bundle, bundle)
    targets, key, known = two_boards
    dead = f"ssh://nobody@127.0.0.1:{free_port()}"  # nothing listens there
    code, output = run_cli(
        "validate", str(bundle), "--runner", targets[0], "--runner", dead, "--key", str(key),
        "--known-hosts", str(known), "--artifact", ONNX, "--warmup", "0", "--runs", "2", "--ray", ray_cluster,
    )  # fmt: skip
    assert code == 1, output
    doc = json.loads((bundle / "validation.json").read_text())
    assert doc["runners"][targets[0]]["passed"]
    dropped = doc["runners"][dead]
    assert dropped["dropped"] and "connection dropped or timed out" in dropped["dropped"]
    assert "dropped" in output


def test_several_runners_without_ray_run_one_after_another(pixel8_bundle, board, tmp_path):
    bundle = tmp_path / "pixel8"
    shutil.copytree(pixel8_bundle, bundle)
    target, key, known, _ = board
    code, output = run_cli(
        "validate", str(bundle), "--runner", "host", "--runner", target, "--key", str(key), "--known-hosts",
        str(known), "--artifact", ONNX, "--warmup", "0", "--runs", "2",
    )  # fmt: skip
    assert code == 0, output
    assert "one after another" in output and "sys.modules" not in output
    doc = json.loads((bundle / "validation.json").read_text())
    assert set(doc["runners"]) == {"host", target}
    host, ssh = doc["runners"]["host"], doc["runners"][target]
    assert host["placement"]["finished_unix"] <= ssh["placement"]["started_unix"]
