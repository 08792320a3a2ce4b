"""Ray on a real local cluster (a head and a worker node, loopback only, one CPU each): `edgelm validate
--runner A --runner B --ray` (a device farm: two loopback SSH boards validated at once) and `edgelm export
--search --ray` (the candidates as Ray tasks: the same choice as the sequential search, a killed worker's task
retried)."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import free_port, start_sshd

from edgelm.cli import ray_flag_value
from edgelm.pipeline import FAULT_KILL_ONCE
from tests.test_cli import run_cli
from tests.test_search import _profile, _search, boundary_classifier  # noqa: F401 (a fixture)

# not imported here: Ray reads its cluster token when it is first imported, after the fixture has set it
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray not installed (edgelm[ray])")
ONNX = "model.int8_dynamic.onnx"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """``ray start --head`` and one ``ray start --address`` worker node on 127.0.0.1; the address."""
    port = free_port()
    # Ray's sockets live under --temp-dir and a Unix socket path is at most 107 bytes: a short folder in /tmp
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    # Ray 2.5x authenticates every process of a cluster with a token: one for this cluster and this driver
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    env = dict(os.environ)
    # the cluster's workers kill themselves on the first search candidate they run (once): Ray must retry it
    env[FAULT_KILL_ONCE] = str(tmp / "killed-once")
    ray_cli = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    head = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard",
            "false", "--temp-dir", str(tmp), *common]  # fmt: skip
    subprocess.run(head, check=True, capture_output=True, env=env, timeout=120)
    address = f"127.0.0.1:{port}"
    worker = [ray_cli, "start", "--address", address, "--node-ip-address", "127.0.0.1", *common]
    subprocess.run(worker, check=True, capture_output=True, env=env, timeout=120)
    yield address, tmp / "killed-once"
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env, timeout=120)
    shutil.rmtree(tmp, ignore_errors=True)
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
        "--known-hosts", str(known), "--artifact", ONNX, "--warmup", "1", "--runs", "3", "--ray", ray_cluster[0],
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
        "--known-hosts", str(known), "--artifact", ONNX, "--warmup", "0", "--runs", "2", "--ray", ray_cluster[0],
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
    assert {"host", target} <= set(doc["runners"])
    host, ssh = doc["runners"]["host"], doc["runners"][target]
    assert host["placement"]["finished_unix"] <= ssh["placement"]["started_unix"]


def test_search_on_ray_picks_the_sequential_choice(boundary_classifier, memo_tsv, ray_cluster, tmp_path):  # noqa: F811
    """A tight budget makes the search back off through several candidates: on Ray they are tried two at a
    time (the cluster's CPUs) and the same one is chosen; the first task's worker dies and Ray retries it."""
    address, killed = ray_cluster
    tight = _profile(tmp_path / "p", min_top1_agreement=1.0, max_accuracy_drop=100.0)
    code, text, out = _search(tmp_path / "seq", boundary_classifier, memo_tsv, tight, max_sparsity=0)
    assert code == 0, text
    code, text, out_ray = _search(
        tmp_path / "ray", boundary_classifier, memo_tsv, tight, "--ray", address, max_sparsity=0
    )
    assert code == 0, text
    seq = json.loads((out / "dev" / "report.json").read_text())["search"]["candidates"]
    par = json.loads((out_ray / "dev" / "report.json").read_text())["search"]["candidates"]

    def chosen(cands):
        c = next(c for c in cands if c["status"] == "chosen")
        return c["sparsity"], c["scheme"], c["float_layers"]

    assert chosen(par) == chosen(seq) and len([c for c in seq if c["accuracy"] is not None]) > 1
    k = next(i for i, c in enumerate(seq) if c["status"] == "chosen")
    assert [c["status"] for c in par[:k]] == [c["status"] for c in seq[:k]]  # the same rejections before it
    tried = [c for c in par if c["ran_on"]]
    assert tried and all(c["accuracy"] is not None for c in tried)  # complete, the killed task included
    assert killed.is_file()  # a worker did die on its first candidate
    assert all(c["ran_on"] is None for c in seq)
    assert "Ray)" in (out_ray / "dev" / "report.md").read_text()


def test_ray_needs_search_on_export(tiny_classifier, tmp_path):
    code, output = run_cli("export", "--device", "pixel8", "--model", str(tiny_classifier), "--ray", "auto",
                           "--out", str(tmp_path / "dist"))  # fmt: skip
    assert code == 2 and "add --search" in output


def test_finetune_sweep_as_tune_trials(tiny_bert, memo_tsv, ray_cluster, tmp_path):
    """`edgelm finetune --sweep lr=... --sweep epochs=...`: every combination is a Ray Tune trial (one per
    node at a time here), each writes its checkpoint; the best by eval accuracy becomes --out."""
    from edgelm.models import load_model

    address, _ = ray_cluster
    out = tmp_path / "ft"
    code, output = run_cli(
        "finetune", "--model", str(tiny_bert), "--data", str(memo_tsv), "--eval", str(memo_tsv), "--out", str(out),
        "--sweep", "lr=3e-3,1e-6", "--sweep", "epochs=2", "--batch-size", "16", "--seq-len", "32", "--ray", address,
    )  # fmt: skip
    assert code == 0, output
    record = json.loads((out / "sweep.json").read_text())
    trials = record["trials"]
    assert sorted(t["values"]["lr"] for t in trials) == [1e-6, 3e-3] and all(t["values"]["epochs"] == 2 for t in trials)
    assert all(t["error"] is None and t["node"] for t in trials)
    best = max(trials, key=lambda t: t["metrics"]["eval_accuracy"])
    assert record["best"]["values"] == best["values"]
    for t in trials:  # each trial's own checkpoint, and the best one copied to --out
        assert (Path(t["checkpoint"]) / "config.json").is_file()
    assert load_model(str(out)).labels == load_model(best["checkpoint"]).labels
    assert (out / "model.safetensors").read_bytes() == (Path(best["checkpoint"]) / "model.safetensors").read_bytes()
    assert "finetune sweep: 2 trials on Ray Tune" in output


def test_sweep_refuses_unknown_keys_and_missing_eval(tiny_bert, memo_tsv, tmp_path):
    code, output = run_cli("finetune", "--model", str(tiny_bert), "--data", str(memo_tsv), "--eval", str(memo_tsv),
                           "--out", str(tmp_path / "o"), "--sweep", "momentum=0.9")  # fmt: skip
    assert code == 2 and "KEY one of lr, epochs" in output
    code, output = run_cli("finetune", "--model", str(tiny_bert), "--data", str(memo_tsv), "--out", str(tmp_path / "o"),
                           "--sweep", "lr=1e-3,1e-4")  # fmt: skip
    assert code == 2 and "--eval" in output
    code, output = run_cli("finetune", "--model", str(tiny_bert), "--data", str(memo_tsv), "--eval", str(memo_tsv),
                           "--out", str(tmp_path / "o"), "--sweep", "epochs=two")  # fmt: skip
    assert code == 2 and "epochs takes int values" in output


def test_hypernet_sweep_over_seeds(tiny_bert, ray_cluster, tmp_path):
    """`edgelm hypernet train --sweep seed=0,1`: two meta-trainings as Tune trials; the one with the higher
    meta-validation accuracy (SMS Spam, held out of --tasks) is the hypernetwork in --out."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "cola").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    address, _ = ray_cluster
    out = tmp_path / "hn"
    code, output = run_cli(
        "hypernet", "train", "--model", str(tiny_bert), "--data-dir", str(SHARED_DATA), "--out", str(out),
        "--tasks", "cola,trec", "--episodes", "6", "--per-task", "40", "--seq-len", "32", "--sweep", "seed=0,1",
        "--ray", address,
    )  # fmt: skip
    assert code == 0, output
    record = json.loads((out / "sweep.json").read_text())
    assert sorted(t["values"]["seed"] for t in record["trials"]) == [0, 1] and record["metric"] == "validation_accuracy"
    best = max(record["trials"], key=lambda t: t["metrics"]["validation_accuracy"])
    hn = json.loads((out / "hypernet.json").read_text())
    assert hn["validation"]["task"] == "sms_spam" and hn["validation"]["best_accuracy"] == max(
        t["metrics"]["validation_accuracy"] for t in record["trials"]
    )
    assert record["best"]["values"] == best["values"]
    written = {p.name for p in Path(best["checkpoint"]).iterdir()}
    assert written and written <= {p.name for p in out.iterdir()}
