"""The export bundle on disk (``dist/<device>/``): the typed manifest and its reader.

:class:`Manifest` (pydantic, schema :data:`SCHEMA`) is written by the pipeline and read by validation, the
Android bundle and the runners. A bundle is untrusted input: :meth:`Bundle.load` refuses a manifest with
missing or mistyped fields, and any file it names (artifact, companion, golden set, tokenizer file,
adapter weights) that is not a plain name inside the bundle: absolute paths, ``..``, separators, and
symlinks that lead out of the folder are refused before anything runs. :meth:`Bundle.verify` checks a
file's sha256 against the manifest, and runners check it before an artifact is loaded.

Ground floor: numpy and pydantic only (no torch); imports nothing above it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticError

from edgelm import tasks
from edgelm.errors import ValidationError
from exporters.base import sha256_file

#: The manifest's schema name and version; a bundle of another schema is refused (export it again).
SCHEMA = "edgelm-bundle/1"
MANIFEST_FILE = "manifest.json"


def android_assets(bundle_dir: str | os.PathLike) -> Path:
    """Where ``--bundle android`` puts the demo app's asset folder: ``<bundle>/android/edgelm``."""
    return Path(bundle_dir) / "android" / "edgelm"


def _plain_name(value: str) -> str:
    """A file name inside the bundle: no directory part, not ``.``/``..``, no NUL, not empty."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ValueError(f"{value!r} is not a plain file name inside the bundle")
    return value


#: A file named by the manifest: a plain name in the bundle's folder.
BundleFile = Annotated[str, AfterValidator(_plain_name)]


class _Model(BaseModel):
    """Manifest parts: unknown keys are kept (a newer edgelm may add some), known keys are typed."""

    model_config = ConfigDict(extra="allow")


class QuantInfo(_Model):
    scheme: str
    per_channel: bool = True
    embedding_bits: int | None = None
    group_size: int = 32
    float_layers: list[str] = Field(default_factory=list)


class GatesInfo(_Model):
    """The acceptance gates of one artifact (see :class:`edgelm.recipe.Gates`)."""

    min_cosine: float
    min_top1_agreement: float
    max_accuracy_drop: float
    max_size_mb: float
    max_perplexity_ratio: float = 1.05
    min_token_agreement: float = 0.5


class PlanInfo(_Model):
    format: str
    quant: QuantInfo
    delegate: str
    gates: GatesInfo
    artifact: BundleFile


class RecipeInfo(_Model):
    device: str
    seq_len: int = Field(ge=2)
    threads: int = Field(ge=1)
    plans: list[PlanInfo]


class TensorInfo(_Model):
    name: str
    dtype: str
    shape: list[int | str]


class CompanionInfo(_Model):
    file: BundleFile
    role: str
    sha256: str
    size_bytes: int


class ArtifactEntry(_Model):
    """One artifact: its file, format, quantization, checksum, signature and export facts."""

    file: BundleFile
    format: str
    quantization: QuantInfo
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    runtime: dict[str, str] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)
    export_seconds: float = 0.0
    companions: list[CompanionInfo] = Field(default_factory=list)
    sparsity: float = 0.0
    golden_reference: str = "reference"
    estimate: dict[str, Any] | None = None


class GoldenInfo(_Model):
    file: BundleFile
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    count: int = Field(ge=1)
    source: str | None = None
    output: str


class TokenizerInfo(_Model):
    files: list[BundleFile]
    max_length: int = Field(ge=2)


class ModelInfo(_Model):
    kind: str
    output: str


class DeviceInfo(_Model):
    name: str
    display_name: str = ""
    hardware: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)


class AdapterEntry(_Model):
    file: BundleFile
    sha256: str
    artifact: BundleFile


class Manifest(_Model):
    """``manifest.json``: what the pipeline exported and how to check it."""

    schema_: str = Field(SCHEMA, alias="schema")
    edgelm_version: str
    created: str
    device: DeviceInfo
    recipe: RecipeInfo
    model: ModelInfo
    tokenizer: TokenizerInfo
    labels: list[str] | None = None
    golden: GoldenInfo
    compression: dict[str, Any] | None = None
    artifacts: list[ArtifactEntry]
    adapters: list[AdapterEntry] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_json(self) -> str:
        """The manifest as written to ``manifest.json`` (indented JSON, ``schema`` first)."""
        return json.dumps(self.model_dump(by_alias=True, mode="json"), indent=2) + "\n"


def _first_error(exc: PydanticError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}" + (f" ({len(exc.errors())} problems)" if len(exc.errors()) > 1 else "")


class Bundle:
    """An export bundle read from disk: its typed manifest and golden set.

    Attributes:
        path: the bundle folder. manifest: the :class:`Manifest`.
        location: where the bundle lives for the records (validation.json): ``path`` resolved, or the
            final folder of an export still being written in a temp folder.
    """

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest
        self.location = self.path.resolve()
        self._golden: dict[str, np.ndarray] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Bundle:
        """Read and check ``path/manifest.json``. Raises ValidationError (exit 2) when the folder or the
        manifest is missing, the manifest is corrupt, of another schema, has missing or mistyped fields, or
        names a file outside the bundle (absolute, ``..``, or a symlink leading out), or the golden set is
        missing."""
        path = Path(path)
        if not path.is_dir():
            raise ValidationError(
                f"bundle not found: {path} is not a directory (run `edgelm export --device ...` first; it "
                "writes dist/<device>/)"
            )
        mf = path / MANIFEST_FILE
        if not mf.is_file():
            raise ValidationError(f"{path} is not an edgelm bundle: it has no manifest.json (run `edgelm export`)")
        try:
            raw = json.loads(mf.read_text())
        except (OSError, ValueError) as exc:
            raise ValidationError(f"{mf} is corrupt ({exc}): export the bundle again") from None
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            found = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
            raise ValidationError(f"{mf} is not an {SCHEMA} manifest (schema: {found!r}): export the bundle again")
        try:
            manifest = Manifest.model_validate(raw)
        except PydanticError as exc:
            raise ValidationError(
                f"{mf} is not a valid edgelm manifest: {_first_error(exc)}; export it again"
            ) from None
        bundle = cls(path, manifest)
        for name in bundle.files():
            bundle.file(name)  # refuses a symlink that leads out of the bundle
        if not (path / manifest.golden.file).is_file():
            raise ValidationError(f"{path} has no {manifest.golden.file}: the bundle is incomplete, export it again")
        return bundle

    def files(self) -> list[str]:
        """Every file the manifest names: golden set, tokenizer files, artifacts, companions, adapters."""
        m = self.manifest
        names = [m.golden.file, *m.tokenizer.files]
        for a in m.artifacts:
            names += [a.file, *(c.file for c in a.companions)]
        return names + [a.file for a in m.adapters]

    def file(self, name: str) -> Path:
        """The path of ``name`` in the bundle. Raises ValidationError when it resolves outside the bundle
        (a symlink that leads out)."""
        root = self.path.resolve()
        p = self.path / name
        if not p.resolve().is_relative_to(root):
            raise ValidationError(f"{self.path}: {name} leads outside the bundle (a symlink?): refused")
        return p

    def verify(self, name: str, sha256: str) -> str | None:
        """None when the file ``name`` exists and has ``sha256``; else a line saying what differs."""
        p = self.file(name)
        got = sha256_file(p) if p.is_file() else "missing"
        return None if got == sha256 else f"{name}: {got[:12]} != manifest {sha256[:12]}"

    def checksums(self, name: str) -> dict[str, str]:
        """``{file: sha256}`` of artifact ``name`` and its companion files, from the manifest."""
        entry = self.artifact(name)
        return {entry.file: entry.sha256, **{c.file: c.sha256 for c in entry.companions}}

    @property
    def device(self) -> str:
        return self.manifest.device.name

    @property
    def kind(self) -> str:
        return self.manifest.model.kind

    @property
    def artifact_names(self) -> list[str]:
        return [a.file for a in self.manifest.artifacts]

    @property
    def threads(self) -> int:
        return self.manifest.recipe.threads

    @property
    def seq_len(self) -> int:
        return self.manifest.recipe.seq_len

    def artifact(self, name: str) -> ArtifactEntry:
        """The manifest entry of artifact ``name``. Raises ValidationError for a name not in the bundle."""
        for a in self.manifest.artifacts:
            if a.file == name:
                return a
        raise ValidationError(f"{name} is not an artifact of {self.path} (it has {', '.join(self.artifact_names)})")

    def plan(self, name: str) -> PlanInfo:
        """The recipe plan (format, quantization, gates) that produced artifact ``name``."""
        entry = self.artifact(name)
        for p in self.manifest.recipe.plans:
            if p.artifact == name or (p.format == entry.format and p.quant.scheme == entry.quantization.scheme):
                return p
        raise ValidationError(f"{name}: the manifest's recipe has no plan for it; export the bundle again")

    @property
    def golden(self) -> dict[str, np.ndarray]:
        """The golden set's arrays (``input_ids``, ``attention_mask``, ``reference``..., ``labels``)."""
        if self._golden is None:
            try:
                with np.load(self.file(self.manifest.golden.file)) as z:
                    self._golden = {k: z[k] for k in z.files}
            except (OSError, ValueError) as exc:
                raise ValidationError(f"the golden set of {self.path} is unreadable: {exc}") from None
        return self._golden

    def reference(self, name: str) -> np.ndarray:
        """PyTorch fp32 outputs for artifact ``name`` on the golden inputs, float32 [N, ...]."""
        key = self.artifact(name).golden_reference
        if key not in self.golden:
            raise ValidationError(f"{name}: the golden set has no {key!r}; export the bundle again")
        return self.golden[key]

    @property
    def labels(self) -> np.ndarray | None:
        """Golden-set labels, int64 [N], for a classifier with a labeled golden set; else None."""
        return self.golden.get("labels") if tasks.for_kind(self.kind).uses_labels else None

    @property
    def baseline_accuracy(self) -> float | None:
        """PyTorch fp32 accuracy (%) on the golden set (the unpruned model's), or None without labels."""
        if self.labels is None:
            return None
        return float((self.golden["reference"].argmax(axis=1) == self.labels).mean() * 100.0)
