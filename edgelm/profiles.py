"""Device profiles: TOML files in ``device_profiles/`` validated by the schema below.

A profile states a target's hardware facts, the runtimes and delegates it can use, its budgets, the
quantization it prefers per format, and how edgelm reaches it for validation. Unknown keys, missing
fields and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import exporters
from edgelm.errors import ProfileError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Hardware(_Strict):
    """What the target is. ``cpu``: core layout; ``isa_features``: e.g. neon, dotprod, i8mm, fp16, sve2,
    avx2, avx512_vnni; ``ram_mb``: total RAM in MB (the smallest variant sold). For the cost model
    (:mod:`edgelm.compress.estimate`): ``cpu_gflops_fp32`` and ``cpu_gops_int8``, the sustained GEMM rate of
    one big core in GFLOP/s and int8 GOP/s (XNNPACK-class kernels, not the datasheet peak; the int8 rate with
    an int8 dot-product instruction: the cost model takes 0.4 of it when ``isa_features`` list none of
    dotprod, i8mm, avx512_vnni, avx_vnni, amx_int8), and ``memory_bandwidth_gbs``, the practical DRAM
    bandwidth in GB/s."""

    soc: str
    cpu: str
    cpu_cores: int = Field(gt=0)
    arch: Literal["arm64", "x86_64"]
    isa_features: list[str]
    ram_mb: int = Field(gt=0)
    cpu_gflops_fp32: float = Field(gt=0)
    cpu_gops_int8: float = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0)
    gpu: str | None = None
    npu: str | None = None


class Runtimes(_Strict):
    """Backends the target can run, most preferred first: ExecuTorch backends (partitioners), TFLite
    delegates, ONNX Runtime execution providers."""

    executorch_backends: list[str]
    tflite_delegates: list[str]
    onnx_execution_providers: list[str]


class Budgets(_Strict):
    """What an artifact may spend: size in MB, peak RAM in MB, latency in ms at ``latency_seq_len`` tokens."""

    max_artifact_mb: float = Field(gt=0)
    max_peak_ram_mb: float = Field(gt=0)
    target_latency_ms: float = Field(gt=0)
    latency_seq_len: int = Field(ge=2, le=512)


class Gates(_Strict):
    """Optional per-device overrides of the recipe's acceptance gates (None: the recipe's default)."""

    min_cosine: float | None = Field(default=None, ge=-1, le=1)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=100)


class Validation(_Strict):
    """How edgelm reaches the target: ``runner`` (host, emulator, ssh, adb); ``emulator_cpu`` is the qemu
    CPU model closest to the target's cores; ``ssh`` an ``ssh://user@host[:port]`` URL; ``threads`` the CPU
    threads the runtimes use on the target."""

    runner: Literal["host", "emulator", "ssh", "adb"]
    emulator_cpu: str | None = None
    ssh: str | None = None
    adb_serial: str | None = None
    threads: int = Field(default=4, gt=0)


class Compression(_Strict):
    """Optional compression the recipe asks for on this device: ``sparsity``, the share of attention heads
    and FFN neurons pruned before export (classifiers; ``--prune`` overrides); ``max_sparsity``, the largest
    ratio ``--search`` tries (``--max-sparsity`` overrides)."""

    sparsity: float = Field(default=0.0, ge=0, lt=1)
    max_sparsity: float = Field(default=0.5, ge=0, lt=1)


class Llm(_Strict):
    """Generative models (text-generation) on this device: ``context_length`` is the KV cache's positions
    (prompt + generated tokens, the longest prefill); ``formats`` the artifacts exported (ExecuTorch, ONNX,
    LiteRT); ``scheme`` their quantization (``8da4w``: int8 dynamic activations, int4 weights in groups of
    ``group_size``; ExecuTorch and ONNX keep 8-bit embeddings, LiteRT's recipe takes 32 or 128);
    ``quantization`` a scheme of a format's own (LiteRT: ``int8_dynamic``, int8 per-channel weights);
    ``max_artifact_mb`` their size budget, MB;
    ``smoothquant_alpha`` SmoothQuant's migration strength for LiteRT ``int8_dynamic`` decoders (0: off);
    ``min_decode_tokens_per_s`` the decode speed the device must reach (compared with the cost model's
    estimate; host measurements are not device speed); ``ram_budget_mb`` what the weights and the KV cache
    may take, MB."""

    context_length: int = Field(default=1024, ge=16, le=32768)
    formats: list[Literal["executorch", "onnx", "tflite"]] = ["executorch", "onnx"]
    scheme: Literal["8da4w", "fp32"] = "8da4w"
    quantization: dict[Literal["executorch", "onnx", "tflite"], Literal["8da4w", "int8_dynamic", "fp32"]] = {}
    group_size: Literal[32, 64, 128, 256] = 32
    max_artifact_mb: float = Field(default=512.0, gt=0)
    smoothquant_alpha: float = Field(default=0.5, ge=0, le=1)
    min_decode_tokens_per_s: float = Field(default=10.0, gt=0)
    ram_budget_mb: float = Field(default=1024.0, gt=0)


class DeviceProfile(_Strict):
    """One device. ``quantization`` maps each format the device runs to its preferred scheme; a format
    not listed is not exported for this device (``--format`` may still ask for it)."""

    name: str
    display_name: str
    kind: Literal["phone", "board", "host"]
    notes: str = ""
    hardware: Hardware
    runtimes: Runtimes
    budgets: Budgets
    quantization: dict[str, str]
    validation: Validation
    gates: Gates = Gates()
    compression: Compression = Compression()
    llm: Llm = Llm()

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str) -> str:
        """The name becomes the output folder (``dist/<name>``): a plain file name, nothing that leaves it."""
        checks = (
            (not value.strip(), "it is empty"),
            ("/" in value or "\\" in value, "it contains a path separator"),
            (value.startswith(".") or ".." in value, "it starts with '.' or contains '..'"),
            (any(ord(c) < 32 for c in value), "it contains a control character"),
            (len(value) > 100, "it is longer than 100 characters"),
        )
        bad = next((why for cond, why in checks if cond), None)
        if bad:
            raise ValueError(f"the name becomes the output folder and must be a plain file name, but {bad}")
        return value

    @field_validator("quantization")
    @classmethod
    def _known_formats_and_schemes(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one format must be listed")
        for fmt, scheme in value.items():
            if fmt not in exporters.formats():
                raise ValueError(f"unknown format {fmt!r} (known: {', '.join(exporters.formats())})")
            supported = exporters.get(fmt).schemes
            if scheme not in supported:
                raise ValueError(f"{fmt}: unknown scheme {scheme!r} (supported: {', '.join(supported)})")
        return value

    @model_validator(mode="after")
    def _reachable(self) -> DeviceProfile:
        if self.validation.runner == "ssh" and not self.validation.ssh:
            raise ValueError("validation.runner is 'ssh' but validation.ssh (ssh://user@host) is not set")
        return self

    @property
    def formats(self) -> list[str]:
        return list(self.quantization)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def profiles_dir() -> Path:
    """The folder of the built-in profiles (``device_profiles/`` in the source tree)."""
    return Path(str(resources.files("edgelm.device_profiles")))


def available_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def _format_errors(path: Path, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif e["type"] == "missing":
            parts.append(f"missing field '{key}'")
        else:
            parts.append(f"key '{key}': {e['msg']} (got {e.get('input')!r})")
    return f"device profile {path}: " + "; ".join(parts)


def load_profile_file(path: Path) -> DeviceProfile:
    """Parse and validate one profile TOML. Raises ProfileError naming the file and the key."""
    path = Path(path)
    if path.is_dir():
        raise ProfileError(f"device profile {path} is a folder: pass a profile .toml file or a device name")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"device profile not found: {path}") from None
    except OSError as exc:
        raise ProfileError(f"device profile {path} cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"device profile {path} is not valid TOML: {exc}") from None
    try:
        profile = DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_format_errors(path, exc)) from None
    return profile


def load_profile(device: str | Path) -> DeviceProfile:
    """A built-in profile by name (``pixel8``) or a profile TOML by path (``./my-board.toml``).

    Raises:
        ProfileError: unknown name (the message suggests the nearest names), or an invalid file.
    """
    device = str(device)
    if device.endswith(".toml") or "/" in device:
        return load_profile_file(Path(device))
    names = available_profiles()
    if device not in names:
        near = difflib.get_close_matches(device, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ProfileError(
            f"unknown device {device!r}.{hint} Known devices: {', '.join(names)} "
            "(`edgelm devices` lists them; a path to your own .toml works too)."
        )
    profile = load_profile_file(profiles_dir() / f"{device}.toml")
    if profile.name != device:
        raise ProfileError(f"device profile {device}.toml: key 'name' is {profile.name!r}, expected {device!r}")
    return profile


def all_profiles() -> list[DeviceProfile]:
    """Every built-in profile, validated (raises ProfileError on the first bad one)."""
    return [load_profile(n) for n in available_profiles()]
