"""The adb runner: a bundle on an Android phone through the demo app's instrumented on-device check, whose
results JSON (:data:`DEVICE_RESULTS_SCHEMA`) it pulls and reads."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgelm.bundle import android_assets
from edgelm.errors import ValidationError
from edgelm.validate.host import HostRunner
from edgelm.validate.runner import ArtifactRun, BundleJob, OnResult, RunnerDropped, RunResult

#: The results JSON the Android demo app's instrumented test writes (examples/android) and the adb runner
#: reads: ``{"schema": DEVICE_RESULTS_SCHEMA, "device": {"model", "abi", "sdk", ...}, "artifacts": [{"artifact":
#: file name, "error": null or why, "format", "runtime": {name: version}, "threads", "warmup", "runs",
#: "latency_seq_len", "latency_samples_ms": [ms, ...], "load_ms", "peak_rss_mb", "outputs": [[float, ...], ...]
#: (one row per golden input), "eval_outputs": [[...], ...] or null}]}``.
DEVICE_RESULTS_SCHEMA = "edgelm-device-results/1"


def parse_device_results(data: dict, artifacts: list[str]) -> list[ArtifactRun]:
    """Turn the app's results JSON (:data:`DEVICE_RESULTS_SCHEMA`) into one :class:`ArtifactRun` per expected
    artifact (one the app did not report is an error). Raises ValidationError for another schema."""
    if not isinstance(data, dict) or data.get("schema") != DEVICE_RESULTS_SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ValidationError(
            f"the device's results JSON is not {DEVICE_RESULTS_SCHEMA} (got {got!r}): install "
            "the demo app built from this edgelm's examples/android"
        )
    device = data.get("device") or {}
    by_name = {a.get("artifact"): a for a in data.get("artifacts") or [] if isinstance(a, dict)}
    runs = []
    for name in artifacts:
        entry = by_name.get(name)
        if entry is None:
            runs.append(ArtifactRun(name, error=f"{name}: the app reported no result for it"))
            continue
        if entry.get("error"):
            runs.append(ArtifactRun(name, error=f"{name} failed on the phone: {entry['error']}"))
            continue
        try:
            outputs = np.asarray(entry["outputs"], dtype=np.float32)
            ev = entry.get("eval_outputs")
            result = {k: v for k, v in entry.items() if k not in ("outputs", "eval_outputs")}
            result["latency_samples_ms"] = [float(x) for x in entry["latency_samples_ms"]]
            result.setdefault("machine", device.get("abi", "android"))
            result["device"] = device
            # the app's checks of the whole bundle: its tokenizer against Hugging Face's ids, and (generation)
            # the golden prompts as text through LlmModule
            result["device_checks"] = {k: data.get(k) for k in ("tokenization", "text_generation") if data.get(k)}
            runs.append(
                ArtifactRun(
                    name,
                    result=RunResult(
                        outputs=outputs, result=result, eval_outputs=None if ev is None else np.asarray(ev, np.float32)
                    ),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            runs.append(ArtifactRun(name, error=f"{name}: malformed entry in the device's results JSON: {exc}"))
    return runs


class AdbRunner(HostRunner):
    """Runs a bundle on an Android phone over adb: ``adb`` (the one attached device) or ``adb:SERIAL``.

    Pushes the bundle's Android app folder (``android/edgelm/`` from ``edgelm export --bundle android``: its
    manifest, vocabulary, labels, golden set and the artifacts to run) and the eval set into the demo app's
    external files directory (``/sdcard/Android/data/<app>/files/edgelm/<bundle>/``, readable by the app
    without a permission), runs the app's instrumented on-device accuracy check (``am instrument -w`` with the
    bundle, artifacts, threads, warm-up and runs as ``-e`` arguments), pulls the results JSON it writes
    (:data:`DEVICE_RESULTS_SCHEMA`) and reads it. The app is examples/android; build and install it first (its
    README says how).

    Args:
        target: ``adb`` or ``adb:SERIAL`` (a serial from ``adb devices``).
        adb: the adb executable (default: ``adb`` on PATH).
        app_id: the demo app's application id; its test package is ``<app_id>.test``.
    Raises:
        ValidationError: a malformed target, or adb not installed.
    """

    name = kind = "adb"
    APP_ID = "dev.edgelm.demo"
    TEST_RUNNER = "androidx.test.runner.AndroidJUnitRunner"
    RESULTS_FILE = "edgelm-results.json"

    def __init__(self, target: str = "adb", *, adb: str | None = None, app_id: str = APP_ID, timeout_s: float = 1800.0):
        super().__init__(timeout_s)
        m = re.fullmatch(r"adb(?::([A-Za-z0-9._:-]+))?", target)
        if not m:
            raise ValidationError(f"bad adb target {target!r}: use adb or adb:SERIAL (a serial from `adb devices`)")
        self.serial = m.group(1)
        self.adb = adb or shutil.which("adb")
        if not self.adb:
            raise ValidationError(
                "adb is not installed: `apt-get install adb` (Debian/Ubuntu) or the Android SDK "
                "platform-tools, then connect the phone with USB debugging on"
            )
        self.app_id = app_id
        self.name = f"adb:{self.serial}" if self.serial else "adb"

    def skip_reason(self, artifact: Path) -> str | None:
        """None: whether a ``.pte`` runs is the phone's business, not this machine's packages."""
        return None

    def describe(self) -> dict:
        return {
            "runner": self.name,
            "kind": self.kind,
            "emulated": self.emulated,
            "serial": self.serial,
            "app": self.app_id,
        }

    def remote_dir(self, bundle: Path) -> str:
        """Where the bundle goes on the phone: the app's external files directory."""
        return f"/sdcard/Android/data/{self.app_id}/files/edgelm/{Path(bundle).resolve().name}"

    def adb_command(self, *args: str, serial: str | None = None) -> list[str]:
        """``adb [-s SERIAL] args...``."""
        serial = serial or self.serial
        return [self.adb, *(["-s", serial] if serial else []), *args]

    def devices(self) -> list[tuple[str, str]]:
        """``(serial, state)`` of every device ``adb devices`` lists (state: device, unauthorized, offline...).
        Raises ValidationError when adb itself fails."""
        try:
            proc = subprocess.run([self.adb, "devices"], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise ValidationError("`adb devices` did not answer within 60 s: run `adb kill-server` and retry") from None
        if proc.returncode != 0:
            raise ValidationError(f"`adb devices` failed: {proc.stderr.strip() or proc.returncode}")
        found = []
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and not line.startswith(("List of devices", "*")):
                found.append((parts[0], parts[1]))
        return found

    def select_device(self) -> str:
        """The serial to use. Raises ValidationError with what to do when there is no usable device."""
        found = self.devices()
        ready = [s for s, state in found if state == "device"]
        if self.serial:
            state = dict(found).get(self.serial)
            if state is None:
                listed = ", ".join(f"{s} ({st})" for s, st in found) or "none"
                raise ValidationError(
                    f"no Android device {self.serial} attached (adb devices lists: {listed}); "
                    "check the cable or `adb connect HOST:PORT`"
                )
            if state != "device":
                raise ValidationError(
                    f"Android device {self.serial} is {state}: "
                    + (
                        "accept the USB debugging prompt on the phone"
                        if state == "unauthorized"
                        else "reconnect it (adb reconnect) and retry"
                    )
                )
            return self.serial
        if not ready:
            if found:
                states = ", ".join(f"{s} ({st})" for s, st in found)
                raise ValidationError(
                    f"no usable Android device: adb devices lists {states}; accept the USB "
                    "debugging prompt on the phone or reconnect it"
                )
            raise ValidationError(
                "no Android device: `adb devices` lists none. Connect a phone with USB debugging "
                "on (Settings > Developer options) or start an Android emulator, then retry"
            )
        if len(ready) > 1:
            raise ValidationError(
                f"{len(ready)} Android devices attached ({', '.join(ready)}): pick one with --runner adb:{ready[0]}"
            )
        return ready[0]

    @staticmethod
    def app_bundle(bundle: Path) -> Path:
        """The bundle's Android app folder (``<bundle>/android/edgelm``, from ``edgelm export --bundle android``):
        the app reads its manifest. Raises ValidationError when the bundle has none."""
        app = android_assets(bundle)
        if not (app / "manifest.json").is_file():
            raise ValidationError(
                f"{bundle} has no Android app bundle: export it with `edgelm export --device ... "
                "--bundle android` (the demo app reads android/edgelm/manifest.json)"
            )
        return app

    def push_commands(self, job: BundleJob, serial: str) -> list[list[str]]:
        """adb commands that clear the phone's bundle directory and push the app bundle (manifest, vocabulary,
        labels, golden set, the job's artifacts with their companions) and the eval set into it."""
        remote = self.remote_dir(job.bundle)
        app = self.app_bundle(job.bundle)
        app_job = BundleJob(app, job.artifacts, app / job.golden.name)
        files = [app / "manifest.json", app / "vocab.txt", app / job.golden.name]
        files += [app / "labels.json"] if (app / "labels.json").is_file() else []
        files += [job.eval_set] if job.eval_set else []
        files += [f for name in job.artifacts for f in app_job.files(name)]
        return [
            self.adb_command("shell", shlex.join(["rm", "-rf", remote]), serial=serial),
            self.adb_command("shell", shlex.join(["mkdir", "-p", remote]), serial=serial),
            self.adb_command("push", *[str(f) for f in files], remote + "/", serial=serial),
        ]

    def instrument_command(self, job: BundleJob, serial: str) -> list[str]:
        """``adb shell am instrument -w -e ... <app>.test/<runner>``: the app's on-device accuracy check."""
        remote = self.remote_dir(job.bundle)
        extras = {
            "bundle": remote,
            "artifacts": ",".join(job.artifacts),
            "golden": job.golden.name,
            "warmup": str(job.warmup),
            "runs": str(job.runs),
            "results": f"{remote}/{self.RESULTS_FILE}",
        }
        if job.threads:
            extras["threads"] = str(job.threads)
        if job.eval_set is not None:
            extras["eval"] = job.eval_set.name
        argv = ["am", "instrument", "-w"]
        for k, v in extras.items():
            argv += ["-e", k, v]
        argv.append(f"{self.app_id}.test/{self.TEST_RUNNER}")
        return self.adb_command("shell", shlex.join(argv), serial=serial)

    def pull_command(self, job: BundleJob, serial: str, local: Path) -> list[str]:
        """``adb pull`` of the results JSON into ``local``."""
        return self.adb_command("pull", f"{self.remote_dir(job.bundle)}/{self.RESULTS_FILE}", str(local), serial=serial)

    def _adb_call(self, argv: list[str], what: str) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise RunnerDropped(f"{what} on {self.name}: no answer within {self.timeout_s:.0f} s") from None
        text = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 or "INSTRUMENTATION_FAILED" in text or "Error:" in text:
            last = text.splitlines()[-1] if text else f"exit code {proc.returncode}"
            if "device" in last and ("not found" in last or "offline" in last):
                raise RunnerDropped(f"{what} on {self.name}: the phone was lost ({last})")
            raise ValidationError(f"{what} on {self.name} failed: {last}")
        return text

    def run_bundle(self, job: BundleJob, on_result: OnResult) -> None:
        """Push, run the instrumented check once for all artifacts, pull and read its results JSON.
        Raises ValidationError (no app bundle, no device, app not installed, check failed) or RunnerDropped."""
        app = self.app_bundle(job.bundle)
        try:
            absent = {
                a["file"]: a["reason"] for a in json.loads((app / "manifest.json").read_text()).get("not_in_app", [])
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValidationError(
                f"{app / 'manifest.json'} is unreadable: {exc}; export with --bundle android again"
            ) from None
        for name in job.artifacts:
            if name in absent:
                on_result(ArtifactRun(name, skipped=f"{name}: {absent[name]}"))
        job = dataclasses.replace(job, artifacts=[n for n in job.artifacts if n not in absent])
        if not job.artifacts:
            return
        serial = self.select_device()
        for argv in self.push_commands(job, serial):
            self._adb_call(argv, "pushing the bundle")
        out = self._adb_call(self.instrument_command(job, serial), "the on-device accuracy check")
        if "Unable to find instrumentation" in out:
            raise ValidationError(
                f"the edgelm demo app ({self.app_id}) and its test APK are not installed on "
                f"{serial}: build and install them from examples/android"
            )
        with tempfile.TemporaryDirectory(prefix="edgelm-adb-") as tmp:
            local = Path(tmp) / self.RESULTS_FILE
            self._adb_call(self.pull_command(job, serial, local), "pulling the results")
            try:
                data = json.loads(local.read_text())
            except (OSError, ValueError) as exc:
                raise ValidationError(f"the results JSON pulled from {serial} is unreadable: {exc}") from None
        for run in parse_device_results(data, job.artifacts):
            on_result(run)

    def run_artifact(
        self,
        artifact: Path,
        golden: Path,
        *,
        threads: int | None,
        warmup: int = 5,
        runs: int = 20,
        adapter: Path | None = None,
        eval_set: Path | None = None,
        checksums: dict[str, str] | None = None,
    ) -> RunResult:
        """Run one artifact through the app, which checks every sha256 of its bundle before it runs
        (swapped adapters are not supported on the phone yet)."""
        if adapter is not None:
            raise ValidationError("the adb runner does not swap adapters yet: validate each adapter's bundle")
        got: list[ArtifactRun] = []
        artifact = Path(artifact)
        self.run_bundle(
            BundleJob(
                artifact.parent, [artifact.name], Path(golden), eval_set and Path(eval_set), threads, warmup, runs
            ),
            got.append,
        )
        if got[0].error:
            raise ValidationError(got[0].error)
        return got[0].result
