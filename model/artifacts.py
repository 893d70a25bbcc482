"""The artifact bundle: one directory per trained model, loadable without `training`.

    DIR/manifest.json          format version, backbone, dims, template, answer ids,
                               variant, dataset, metrics, sha256 of every other file
    DIR/tensors.safetensors    the tables and projections its prompt uses (model/bundle.py:
                               mf.*, semantic.items, neutral.*, proj_c.*, proj_w.*)
    DIR/catalog.json           external user/item ids in row order, item titles,
                               each user's recent liked items (oldest first)
    DIR/adapter/               the PEFT LoRA in its standard layout (optional)

Nothing here unpickles: tensors are safetensors, everything else JSON.

Integrity: the manifest's `checksums` must name every file of the directory (itself
excepted), the tensors and the catalog always. A missing, extra or unlisted file, or one
whose sha256 differs, refuses the whole bundle (`verify_bundle`), so that an edit cannot
slip through by also deleting its checksum entry.

Round trip: `save_bundle` writes and `load_bundle` reads, both refusing tensors that do not
back the manifest's prompt (`model.bundle.tensor_problems`). Whether a bundle can be served,
and by which model: model/compat.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors.torch import load_file, save_file

from sellarec.model.backbone import BackboneInfo
from sellarec.model.bundle import Tables, load_projections, nonfinite, tensor_problems
from sellarec.model.collab import Projections
from sellarec.model.prompts import TEMPLATE_ID, Slot, TemplateSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
CATALOG = "catalog.json"
ADAPTER = "adapter"
#: The LoRA weights inside the adapter directory (their checksum identifies the adapter).
ADAPTER_WEIGHTS = f"{ADAPTER}/adapter_model.safetensors"


class ArtifactError(ValueError):
    """An artifact directory is missing, corrupt or does not fit the model it is used with."""


class TemplateRecord(BaseModel):
    """The prompt decision, recorded so that training and serving cannot drift."""

    template_id: str = TEMPLATE_ID
    domain: str
    stage: str
    slots: list[str]
    answer_cue: str
    history_length: int

    def to_spec(self) -> TemplateSpec:
        return TemplateSpec(
            domain=self.domain,
            stage=self.stage,
            slots=tuple(Slot(s) for s in self.slots),
            answer_cue=self.answer_cue,
            history_length=self.history_length,
        )

    @classmethod
    def from_spec(cls, spec: TemplateSpec) -> TemplateRecord:
        return cls(
            domain=spec.domain,
            stage=spec.stage,
            slots=[s.value for s in spec.slots],
            answer_cue=spec.answer_cue,
            history_length=spec.history_length,
        )


class BackboneRecord(BaseModel):
    spec: str
    fingerprint: str
    hidden_size: int
    model_type: str


class Manifest(BaseModel):
    """manifest.json; every field is checked on load."""

    format_version: int = FORMAT_VERSION
    #: Name the service reports as "model" in responses.
    name: str
    #: Paper variant (sellarec, collm, tallrec, mf, ...).
    variant: str
    #: Dataset the model was trained on.
    dataset: str
    backbone: BackboneRecord | None
    collab_dim: int | None
    llm_dim: int | None
    template: TemplateRecord | None
    #: {"yes": id, "no": id} under the backbone's tokenizer after the answer cue.
    answer_token_ids: dict[str, int] | None
    placeholders: list[str] = Field(default_factory=list)
    has_adapter: bool = False
    #: The extension `sellarec-mf`: the score's logit is the LLM's plus the MF dot product of
    #: the same (user, item) vectors (not a paper variant; False for every paper variant).
    mf_residual: bool = False
    n_users: int
    n_items: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    checksums: dict[str, str] = Field(default_factory=dict)

    @property
    def has_llm(self) -> bool:
        """An LLM scores this bundle (False: an MF bundle, scored by the dot product)."""
        return self.backbone is not None and self.template is not None

    @property
    def slots(self) -> tuple[Slot, ...]:
        """The soft-token slots of its prompt (none without an LLM)."""
        return tuple(Slot(s) for s in self.template.slots) if self.template else ()


@dataclass
class Catalog:
    """External ids and the item text a bundle carries."""

    #: External user id of each MF user row.
    users: list[str]
    #: External item id of each item row.
    items: list[str]
    #: Title of each item row.
    titles: list[str]
    #: External user id -> recent liked external item ids, oldest first.
    histories: dict[str, list[str]] = field(default_factory=dict)

    def user_rows(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.users)}

    def item_rows(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.items)}


@dataclass
class Bundle:
    """A loaded, checked bundle."""

    #: Its directory.
    path: Path
    #: manifest.json.
    manifest: Manifest
    #: tensors.safetensors as stored (names: model/bundle.py); read them through the views below.
    tensors: dict[str, torch.Tensor]
    #: catalog.json.
    catalog: Catalog

    @property
    def adapter_dir(self) -> Path | None:
        return self.path / ADAPTER if self.manifest.has_adapter else None

    def tables(self) -> Tables:
        """The embedding tables by role (None where the variant has none)."""
        return Tables.of(self.tensors)

    def projections(self, device: torch.device | str = "cpu") -> Projections:
        """The trained projections, frozen on `device` (None where the prompt has no slot)."""
        backbone = self.manifest.backbone
        llm_dim = self.manifest.llm_dim or (backbone.hidden_size if backbone else 0)
        try:
            return load_projections(self.tensors, llm_dim, device, self.manifest.mf_residual)
        except ValueError as e:  # a scale out of range (model.collab): the bundle is not usable
            raise ArtifactError(f"{self.path}: projection weights: {e}") from e


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_record(info: BackboneInfo) -> BackboneRecord:
    return BackboneRecord(
        spec=info.spec, fingerprint=info.fingerprint, hidden_size=info.hidden_size, model_type=info.model_type
    )


def save_bundle(
    path: str | Path,
    manifest: Manifest,
    tensors: dict[str, torch.Tensor],
    catalog: Catalog,
    adapter: Any | None = None,
) -> Path:
    """Write a bundle atomically (to a sibling temp dir, then renamed into place).

    Refused before anything is written: tensors that do not back the manifest's prompt or
    dimensions (the bundle could not be loaded back).
    """
    path = Path(path)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if problems := tensor_problems(
        shapes, manifest.slots, manifest.n_users, manifest.n_items, manifest.collab_dim, manifest.llm_dim
    ):
        raise ArtifactError(f"{path}: not written, the bundle would be incomplete: {'; '.join(problems)}")
    if bad := nonfinite(tensors):
        raise ArtifactError(f"{path}: not written, {_nonfinite_message(bad)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging / TENSORS)
        (staging / CATALOG).write_text(
            json.dumps(
                {
                    "users": catalog.users,
                    "items": catalog.items,
                    "titles": catalog.titles,
                    "histories": catalog.histories,
                },
                ensure_ascii=False,
            )
        )
        if adapter is not None:
            adapter.save_pretrained(staging / ADAPTER, safe_serialization=True)
            if bad := nonfinite(load_file(staging / ADAPTER_WEIGHTS)):
                raise ArtifactError(f"{path}: not written, {_nonfinite_message(bad, ADAPTER_WEIGHTS)}")
        manifest = manifest.model_copy(update={"has_adapter": adapter is not None})
        manifest.checksums = {
            str(f.relative_to(staging)): sha256_file(f) for f in sorted(staging.rglob("*")) if f.is_file()
        }
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise ArtifactError(
            f"{path} is not an artifact directory (no {MANIFEST}); train one with "
            f"`sellarec-train run` or build the demo with `sellarec-demo`"
        )
    try:
        manifest = Manifest.model_validate_json(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{file} is not UTF-8 text (byte {err.start}); the bundle is corrupt") from err
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the file"
        raise ArtifactError(f"{file} is malformed: {where}: {first['msg']}") from err
    except OSError as err:
        raise ArtifactError(f"{file} cannot be read: {err.strerror or err}") from err
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(
            f"{file}: format version {manifest.format_version}, this build reads {FORMAT_VERSION}"
        )
    return manifest


def bundle_files(path: Path) -> set[str]:
    """Every file under `path` but the manifest, as POSIX paths relative to it."""
    return {f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file()} - {MANIFEST}


def verify_bundle(path: str | Path) -> Manifest:
    """The manifest, once every file of the bundle is listed in it and matches its sha256.

    Refused (ArtifactError): a listed file that is missing, a file that is not listed, a
    listing that omits the tensors or the catalog (or the adapter it declares), a name
    outside the directory, a checksum that differs.
    """
    path = Path(path)
    manifest = read_manifest(path)
    listed = manifest.checksums
    required = {TENSORS, CATALOG}
    for name in sorted(required - set(listed)):
        raise ArtifactError(f"{path}: the manifest lists no checksum for {name}; the bundle is refused")
    if manifest.has_adapter and not any(n.startswith(ADAPTER + "/") for n in listed):
        raise ArtifactError(f"{path}: the manifest declares an adapter but lists none of its files")
    for name in listed:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{path}: the manifest names {name!r}, outside the bundle")
    present = bundle_files(path)
    if missing := sorted(set(listed) - present):
        raise ArtifactError(f"{path}: {missing[0]} is listed in the manifest but missing")
    if unlisted := sorted(present - set(listed)):
        raise ArtifactError(
            f"{path}: {unlisted[0]} is not listed in the manifest (an extra or edited file); "
            f"the bundle is refused"
        )
    for name, expected in sorted(listed.items()):
        if sha256_file(path / name) != expected:
            raise ArtifactError(f"{path}: checksum of {name} differs from the manifest (corrupt or edited)")
    return manifest


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle: every file against the manifest, dims of every tensor."""
    path = Path(path)
    manifest = verify_bundle(path) if verify else read_manifest(path)
    try:
        tensors = load_file(path / TENSORS)
        raw = json.loads((path / CATALOG).read_bytes().decode("utf-8"))
        catalog = Catalog(
            users=raw["users"], items=raw["items"], titles=raw["titles"], histories=raw.get("histories", {})
        )
    except (OSError, ValueError, KeyError, TypeError) as err:  # safetensors, UTF-8 and JSON errors
        raise ArtifactError(
            f"{path}: cannot read the tensors or the catalog ({type(err).__name__}: {err})"
        ) from err
    except Exception as err:  # safetensors raises its own SafetensorError on a damaged header
        raise ArtifactError(f"{path}: cannot read {TENSORS} ({type(err).__name__}: {err})") from err
    bundle = Bundle(path=path, manifest=manifest, tensors=tensors, catalog=catalog)
    check_tensors(path, manifest, {k: tuple(v.shape) for k, v in tensors.items()})
    if bad := nonfinite(tensors):
        raise ArtifactError(f"{path}: {_nonfinite_message(bad)}; the bundle is refused")
    _check_finite_adapter(bundle)
    _check_catalog(bundle)
    return bundle


def _nonfinite_message(names: list[str], file: str = TENSORS) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{file} holds NaN or infinite values in {shown} (a diverged training run? retrain it)"


def _check_finite_adapter(bundle: Bundle) -> None:
    """Refuse LoRA weights holding NaN or infinity (read here: PEFT would load them silently)."""
    if bundle.adapter_dir is None or not (bundle.path / ADAPTER_WEIGHTS).is_file():
        return
    path = bundle.path
    try:
        weights = load_file(path / ADAPTER_WEIGHTS)
    except Exception as err:  # safetensors' own SafetensorError on a damaged header
        raise ArtifactError(f"{path}: cannot read {ADAPTER_WEIGHTS} ({type(err).__name__}: {err})") from err
    if bad := nonfinite(weights):
        raise ArtifactError(f"{path}: {_nonfinite_message(bad, ADAPTER_WEIGHTS)}; the bundle is refused")


def check_tensors(path: Path, m: Manifest, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse tensors (by shape) that do not back the manifest's prompt and dimensions."""
    problems = tensor_problems(shapes, m.slots, m.n_users, m.n_items, m.collab_dim, m.llm_dim)
    if problems:
        raise ArtifactError(f"{path}: {problems[0]}; the bundle is refused")


def _check_catalog(bundle: Bundle) -> None:
    m = bundle.manifest
    if len(bundle.catalog.users) != m.n_users or len(bundle.catalog.items) != m.n_items:
        raise ArtifactError(
            f"{bundle.path}: catalog has {len(bundle.catalog.users)} users / "
            f"{len(bundle.catalog.items)} items, the manifest says {m.n_users} / {m.n_items}"
        )
    if len(bundle.catalog.titles) != m.n_items:
        raise ArtifactError(f"{bundle.path}: {len(bundle.catalog.titles)} titles for {m.n_items} items")
