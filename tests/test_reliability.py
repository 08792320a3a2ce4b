"""Nothing from outside is trusted (issue 12): every bad input ends in one ``error:`` line on stderr, exit 2, no
traceback and nothing half-written; a killed run leaves nothing behind and the next run cleans up after it.
Real files, real subprocesses and (where mount is permitted) real size-limited file systems; no mocks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from edgelm.cli import app
from edgelm.testing import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: the smallest real export: one fp32 ONNX artifact of a tiny model at 16 tokens
FAST = ("--device", "pixel8", "--format", "onnx", "--quant", "fp32", "--seq-len", "16")


def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def error_line(code: int, stderr: str, expected: str | tuple[str, ...]) -> str:
    """Assert exit 2, exactly one ``error:`` line containing ``expected`` and no traceback; returns the line."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    for e in (expected,) if isinstance(expected, str) else expected:
        assert e in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200")
    env.pop("ORT_DISABLE_TELEMETRY", None)  # edgelm must set it itself
    return env


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory):
    """Mount a size-limited tmpfs: ``tmpfs(size, options="")`` -> its path (unmounted at the end)."""
    mounted = []

    def mount(size: str, options: str = "") -> Path:
        d = tmp_path_factory.mktemp("tmpfs")
        opts = f"size={size}" + (f",{options}" if options else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


# --- 1. weights that do not cover the architecture --------------------------------------------------------


def test_classifier_without_its_head_is_refused(tiny_classifier, tmp_path):
    model = tmp_path / "headless"
    shutil.copytree(tiny_classifier, model)
    state = load_file(str(model / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("classifier.")}, str(model / "model.safetensors"))
    out = tmp_path / "dist"
    code, _, err = cli("export", *FAST, "--model", model, "--out", out)
    line = error_line(
        code, err, ("do not cover the architecture", "2 missing tensors (classifier.bias, classifier.weight)")
    )
    assert "random" in line
    assert not out.exists()


def test_foreign_weights_under_a_bert_config_are_refused(tiny_bert, tmp_path):
    """GPT-2-style tensor names (transformer.h.0.attn.c_attn.weight, ...) under a BERT config.json."""
    import torch

    model = tmp_path / "gpt2-under-bert"
    shutil.copytree(tiny_bert, model)
    gpt2 = {f"transformer.h.{i}.attn.c_attn.weight": torch.zeros(64, 192) for i in range(2)}
    gpt2["transformer.wte.weight"] = torch.zeros(100, 64)
    save_file(gpt2, str(model / "model.safetensors"))
    out = tmp_path / "dist"
    code, _, err = cli("export", *FAST, "--model", model, "--out", out)
    error_line(
        code,
        err,
        ("do not cover the architecture", "37 missing tensors (embeddings.", "and 34 more", "3 unexpected tensors"),
    )
    assert not out.exists()


# --- 2. option validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_export_limit_must_be_positive(tiny_bert, labeled_tsv, tmp_path, limit):
    out = tmp_path / "dist"
    code, _, err = cli("export", *FAST, "--model", tiny_bert, "--data", labeled_tsv, "--limit", limit, "--out", out)
    error_line(code, err, f"--limit {limit}")
    assert not out.exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--limit", "0"), "--limit 0"),
        (("--runs", "0"), "--runs 0"),
        (("--warmup", "-1"), "--warmup -1"),
    ],
)
def test_validate_timing_and_limit_options(bundle_copy, args, expected):
    code, _, err = cli("validate", bundle_copy, *args)
    error_line(code, err, expected)
    assert not (bundle_copy / "validation").exists()


@pytest.mark.parametrize("command", ["finetune", "compress"])
def test_training_commands_refuse_a_zero_limit(labeled_tsv, tmp_path, command):
    out = tmp_path / "ckpt"
    extra = ("--model", "x") if command == "compress" else ()
    code, _, err = cli(command, "--data", labeled_tsv, "--out", out, "--eval-limit", "0", *extra)
    error_line(code, err, "--eval-limit 0")
    assert not out.exists()


def test_device_naming_a_folder(tmp_path):
    folder = tmp_path / "profiles.toml"  # a folder, named like a profile file
    folder.mkdir()
    out = tmp_path / "dist"
    for device in (str(folder), str(tmp_path) + "/"):
        code, _, err = cli("export", "--device", device, "--out", out)
        error_line(code, err, ("is a folder", device.rstrip("/")))
    assert not out.exists()


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "x..y", ""])
def test_profile_name_must_be_a_plain_file_name(tmp_path, name):
    from edgelm.profiles import profiles_dir

    text = (profiles_dir() / "pixel8.toml").read_text().replace('name = "pixel8"', f"name = {json.dumps(name)}", 1)
    assert f"name = {json.dumps(name)}" in text
    profile = tmp_path / "evil.toml"
    profile.write_text(text)
    out = tmp_path / "dist"
    code, _, err = cli("export", "--device", profile, "--out", out)
    error_line(code, err, ("key 'name'", "plain file name"))
    assert leftovers(tmp_path) == ["evil.toml"]  # no dist/, nothing beside it


def test_out_is_an_existing_file(tmp_path):
    out = tmp_path / "dist"
    out.write_text("precious")
    code, _, err = cli("export", *FAST, "--out", out)
    error_line(code, err, ("is an existing file", str(out)))
    assert out.read_text() == "precious"


def test_out_below_a_file(tmp_path):
    """A real 'cannot be created' case even as root: a parent of --out is a file."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli("export", *FAST, "--out", blocker / "dist")
    error_line(code, err, ("cannot be created", "is a file"))
    assert leftovers(tmp_path) == ["file"]


def test_out_device_folder_is_a_file(tmp_path):
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "pixel8").write_text("not a folder")
    code, _, err = cli("export", *FAST, "--out", tmp_path / "dist")
    error_line(code, err, ("dist/pixel8", "is an existing file"))
    assert leftovers(tmp_path / "dist") == ["pixel8"]


def test_out_on_a_read_only_file_system(tmpfs):
    """Not writable for real, even as root: a read-only tmpfs (os.access reports it; no chmod trick)."""
    ro = tmpfs("1m", "ro")
    assert not os.access(ro, os.W_OK)
    code, _, err = cli("export", *FAST, "--out", ro / "dist")
    error_line(code, err, ("is not writable", "read-only"))


# --- 3. corrupt tokenizer, oversized CSV field ----------------------------------------------------------------


@pytest.mark.parametrize("content", ["{not json", '{"version": "1.0", "model": 42}'])
def test_corrupt_tokenizer_json(tiny_bert, tmp_path, content):
    model = tmp_path / "m"
    shutil.copytree(tiny_bert, model)
    (model / "tokenizer.json").write_text(content)
    out = tmp_path / "dist"
    code, _, err = cli("export", *FAST, "--model", model, "--out", out)
    error_line(code, err, (str(model / "tokenizer.json"), "not a valid tokenizer"))
    assert not out.exists()


def test_csv_field_over_the_csv_module_limit_is_read(tmp_path):
    """A 200,000-character field (csv's default limit is 131,072) is read, not a traceback; the full export
    with such a field runs in ``exported`` below."""
    from edgelm.data import load_dataset

    path = tmp_path / "long.csv"
    path.write_text('text,label\n"' + "word " * 40_000 + '",1\nshort,0\n')
    ds = load_dataset(path)
    assert len(ds.texts[0]) == 200_000 - 1 and ds.labels == ["1", "0"]


# --- one real export shared by items 3, 5, 6, 10 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real export of a tiny embedding model with a labeled CSV that has a 200,000-character field, into an
    --out that holds a stale partial folder of a dead process and one of this (live) process."""
    d = tmp_path_factory.mktemp("exported")
    model = make_checkpoint(d / "model")
    data = d / "labeled.csv"
    data.write_text("text,label\n" + '"' + "long " * 40_000 + '",1\n' + "".join(f"row {i},{i % 2}\n" for i in range(8)))
    out = d / "dist"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".pixel8.partial-{dead.pid}-abc123"
    live = out / f".pixel8.partial-{os.getpid()}-def456"
    other = out / f".pixel9.partial-{dead.pid}-abc123"  # another device's leftover: not this run's business
    for p in (stale, live, other):
        p.mkdir()
        (p / "half.onnx").write_bytes(b"half")
    old_umask = os.umask(0o022)
    try:
        code, stdout, stderr = cli("export", *FAST, "--model", model, "--data", data, "--out", out)
    finally:
        os.umask(old_umask)
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "stale": stale, "live": live, "other": other}


def test_export_reads_a_huge_csv_field(exported):
    assert exported["code"] == 0, exported["stderr"]
    manifest = json.loads((exported["out"] / "pixel8" / "manifest.json").read_text())
    assert manifest["golden"]["count"] == 9


def test_stale_partial_of_a_dead_run_is_removed_live_one_kept(exported):
    assert not exported["stale"].exists()
    assert exported["live"].exists(), "a folder of a process still running must never be removed"
    assert exported["other"].exists()


def test_output_folder_has_normal_permissions(exported):
    final = exported["out"] / "pixel8"
    assert final.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert (final / "logs").stat().st_mode & 0o777 == 0o755


def test_labels_ignored_by_an_embedding_model_are_one_warning(exported):
    warnings = [line for line in exported["stderr"].splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "labels are ignored" in warnings[0] and "labeled.csv" in warnings[0]
    report = json.loads((exported["out"] / "pixel8" / "report.json").read_text())
    assert report["data"]["labeled"] is False and len(report["data"]["warnings"]) == 1


@pytest.fixture
def bundle_copy(exported, tmp_path) -> Path:
    """A writable copy of the exported bundle without the results of its export-time host check (so that a
    test sees exactly what its own `edgelm validate` wrote, or that it wrote nothing)."""
    assert exported["code"] == 0, exported["stderr"]
    src = exported["out"] / "pixel8"
    assert (src / "validation.json").is_file()  # the export checked it through the validate path
    return Path(shutil.copytree(src, tmp_path / "pixel8", ignore=shutil.ignore_patterns("validation*")))


# --- 4. a disk that fills up -------------------------------------------------------------------------------------


def test_export_into_a_full_disk(tiny_bert, tmpfs):
    """A real export into a 512 KB tmpfs (the bundle needs ~1 MB): ENOSPC at a write step."""
    disk = tmpfs("512k")
    out = disk / "dist"
    code, _, err = cli("export", *FAST, "--model", tiny_bert, "--out", out)
    error_line(code, err, ("no space left on device at", "free space and run again"))
    assert not [p for p in leftovers(out) if ".partial-" in p] and not (out / "pixel8").exists()
    assert leftovers(disk) == [], "the output root the run created is removed again"


def test_validate_onto_a_full_disk(bundle_copy, tmpfs):
    """A bundle on a tmpfs with only a few pages free: the runner's results cannot be stored."""
    disk = tmpfs("16m")
    bundle = Path(shutil.copytree(bundle_copy, disk / "pixel8"))
    st = os.statvfs(disk)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    subprocess.run(["mount", "-o", f"remount,size={used + 2 * 4096}", str(disk)], check=True)
    code, _, err = cli("validate", bundle, "--runs", "1", "--warmup", "0")
    error_line(code, err, ("no space left on device at", "free space and run again"))
    assert not any(".partial-" in p for p in leftovers(bundle) + leftovers(bundle / "validation"))
    assert not (bundle / "validation" / "host").exists()


def test_validate_on_a_read_only_file_system(bundle_copy, tmpfs):
    """EROFS from a real write (no pre-check on this path): one line from the CLI's OSError translation."""
    disk = tmpfs("16m")
    bundle = Path(shutil.copytree(bundle_copy, disk / "pixel8"))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    code, _, err = cli("validate", bundle, "--runs", "1", "--warmup", "0")
    error_line(code, err, ("read-only file system at", str(bundle / "validation")))
    assert not (bundle / "validation").exists()


# --- 5. SIGTERM ------------------------------------------------------------------------------------------------------


def test_sigterm_during_export_leaves_nothing(tiny_bert, tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    args = [str(a) for a in FAST] + ["--model", str(tiny_bert), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgelm.cli", "export", *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(".partial-" in p for p in leftovers(out)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    partial = next(p for p in leftovers(out) if ".partial-" in p)
    assert partial.startswith(f".pixel8.partial-{proc.pid}-")  # the owner's pid is in the name
    time.sleep(1.0)  # mid-export: loading the model / the reference
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert leftovers(out) == [], "no partial folder, no half output"


# --- 7. ONNX Runtime telemetry --------------------------------------------------------------------------------------


def test_host_runner_environment_turns_telemetry_off(monkeypatch):
    from edgelm.validate.runners import HostRunner

    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    assert HostRunner()._env()["ORT_DISABLE_TELEMETRY"] == "1"


def test_every_edgelm_process_turns_telemetry_off():
    """A real subprocess started without the variable: importing edgelm (what the target script does) sets it."""
    code = "import os, edgelm.validate.target; print(os.environ.get('ORT_DISABLE_TELEMETRY'))"
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "1"


def test_ssh_remote_environment_turns_telemetry_off(tmp_path):
    from edgelm.validate.runners import make_runner

    key, known = tmp_path / "key", tmp_path / "known_hosts"
    key.write_text("k")
    known.write_text("h")
    r = make_runner(
        "ssh://pi@10.0.0.2", key_file=key, known_hosts=known, remote_env={"ORT_DISABLE_TELEMETRY": "0", "A": "b"}
    )
    env = r.target_env()
    assert env["ORT_DISABLE_TELEMETRY"] == "1" and env["A"] == "b" and env["PYTHONPATH"] == "."


# --- 8. SSH targets that would be read as options ----------------------------------------------------------------


@pytest.mark.parametrize("target", ["ssh://-oProxyCommand@host", "ssh://pi@-oProxyCommand", "ssh://-x@-y:22"])
def test_ssh_user_or_host_starting_with_dash(bundle_copy, tmp_path, target):
    from edgelm.errors import ValidationError
    from edgelm.validate.runners import make_runner

    key, known = tmp_path / "key", tmp_path / "known_hosts"
    key.write_text("k")
    known.write_text("h")
    with pytest.raises(ValidationError, match="starts with '-'"):
        make_runner(target, key_file=key, known_hosts=known)
    code, _, err = cli("validate", bundle_copy, "--runner", target, "--key", key, "--known-hosts", known)
    error_line(code, err, "starts with '-'")
    assert not (bundle_copy / "validation").exists()


# --- 9. a results folder that is a symlink ---------------------------------------------------------------------------


@pytest.mark.parametrize("link_at", ["validation", "validation/host"])
def test_symlinked_results_folder_is_neither_followed_nor_deleted(bundle_copy, tmp_path, link_at):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "sentinel.txt").write_text("keep me")
    link = bundle_copy / link_at
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(target, target_is_directory=True)
    code, _, err = cli("validate", bundle_copy, "--runs", "1", "--warmup", "0")
    error_line(code, err, ("is a symlink", "neither follows nor deletes"))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert leftovers(target) == ["sentinel.txt"] and (target / "sentinel.txt").read_text() == "keep me"
