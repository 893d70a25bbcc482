"""The artifact bundle: one directory per trained model, loadable without `training`.

    DIR/manifest.json          format version, backbone, dims, template, answer ids,
                               variant, dataset, metrics, sha256 of every other file
    DIR/tensors.safetensors    mf.users [U, d_C], mf.items [I, d_C], semantic.items [I, d_L],
                               neutral.user / neutral.item [d_C], neutral.semantic [d_L],
                               proj_c.* and proj_w.* (the projection state dicts)
    DIR/catalog.json           external user/item ids in row order, item titles,
                               each user's recent liked items (oldest first)
    DIR/adapter/               the PEFT LoRA in its standard layout (optional)

Nothing here unpickles: tensors are safetensors, everything else JSON.

Integrity: the manifest's `checksums` must name every file of the directory (itself
excepted), the tensors and the catalog always. A missing, extra or unlisted file, or one
whose sha256 differs, refuses the whole bundle (`verify_bundle`), so that an edit cannot
slip through by also deleting its checksum entry.
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
from sellarec.model.prompts import TEMPLATE_ID, Slot, TemplateSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
CATALOG = "catalog.json"
ADAPTER = "adapter"


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
    n_users: int
    n_items: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    checksums: dict[str, str] = Field(default_factory=dict)


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
    path: Path
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    catalog: Catalog

    @property
    def adapter_dir(self) -> Path | None:
        return self.path / ADAPTER if self.manifest.has_adapter else None

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix.` with the prefix removed (e.g. proj_c)."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


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
    """Write a bundle atomically (to a sibling temp dir, then renamed into place)."""
    path = Path(path)
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
    _check_shapes(bundle)
    return bundle


def _check_shapes(bundle: Bundle) -> None:
    m = bundle.manifest
    expected = {
        "mf.users": (m.n_users, m.collab_dim),
        "mf.items": (m.n_items, m.collab_dim),
        "semantic.items": (m.n_items, m.llm_dim),
        "neutral.user": (m.collab_dim,),
        "neutral.item": (m.collab_dim,),
        "neutral.semantic": (m.llm_dim,),
    }
    for name, shape in expected.items():
        tensor = bundle.tensors.get(name)
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ArtifactError(
                f"{bundle.path}: {name} has shape {tuple(tensor.shape)}, the manifest says {shape}"
            )
    if len(bundle.catalog.users) != m.n_users or len(bundle.catalog.items) != m.n_items:
        raise ArtifactError(
            f"{bundle.path}: catalog has {len(bundle.catalog.users)} users / "
            f"{len(bundle.catalog.items)} items, the manifest says {m.n_users} / {m.n_items}"
        )
    if len(bundle.catalog.titles) != m.n_items:
        raise ArtifactError(f"{bundle.path}: {len(bundle.catalog.titles)} titles for {m.n_items} items")


def check_compatible(manifest: Manifest, backbone: BackboneInfo, answer_ids: tuple[int, int]) -> None:
    """Refuse a bundle whose backbone, dimensions or answer tokens differ from the model's."""
    if manifest.backbone is None:
        raise ArtifactError(f"variant {manifest.variant!r} has no LLM; it cannot be served by the LLM engine")
    problems = []
    if manifest.backbone.fingerprint != backbone.fingerprint:
        problems.append(
            f"backbone: artifact trained on {manifest.backbone.spec!r} "
            f"(fingerprint {manifest.backbone.fingerprint[:12]}), model is {backbone.spec!r} "
            f"(fingerprint {backbone.fingerprint[:12]})"
        )
    if manifest.llm_dim != backbone.hidden_size:
        problems.append(f"d_L: artifact {manifest.llm_dim}, model {backbone.hidden_size}")
    if manifest.answer_token_ids and tuple(manifest.answer_token_ids.values()) != answer_ids:
        problems.append(f"Yes/No token ids: artifact {manifest.answer_token_ids}, tokenizer {answer_ids}")
    if problems:
        raise ArtifactError("artifact does not match the model: " + "; ".join(problems))
