"""The artifact bundle: bit-exact round trip, checksums, refusals that say what differs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import factories
import pytest
import torch
from safetensors.torch import load_file, save_file

from sellarec.model.artifacts import (
    ADAPTER_WEIGHTS,
    MANIFEST,
    TENSORS,
    ArtifactError,
    Catalog,
    Manifest,
    load_bundle,
    read_manifest,
    save_bundle,
    sha256_file,
    verify_bundle,
)
from sellarec.model.backbone import BackboneInfo, load_backbone, random_backbone
from sellarec.model.bundle import MF_ITEMS, MF_USERS, PROJ_W
from sellarec.model.compat import ModelIdentity, check_compatible, check_servable
from sellarec.model.loader import load_scorer
from sellarec.model.prompts import scoring_prompt


def _small(tmp_path, **overrides):
    tensors = {
        "mf.users": torch.randn(3, 4),
        "mf.items": torch.randn(2, 4),
        "semantic.items": torch.randn(2, 6).double().float(),
        "proj_c.net.0.weight": torch.randn(5, 4),
    }
    manifest = Manifest(
        name="m",
        variant="sellarec",
        dataset="d",
        backbone=None,
        collab_dim=4,
        llm_dim=6,
        template=None,
        answer_token_ids=None,
        n_users=3,
        n_items=2,
        **overrides,
    )
    catalog = Catalog(
        users=["a", "b", "ü"],
        items=["x", "y"],
        titles=["X (1999)", "Ÿ, The"],
        histories={"a": ["x", "y"], "b": []},
    )
    return save_bundle(tmp_path / "bundle", manifest, tensors, catalog), tensors, catalog


def test_round_trip_is_bit_exact(tmp_path):
    path, tensors, catalog = _small(tmp_path)
    bundle = load_bundle(path)
    assert bundle.tensors.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(bundle.tensors[name], t) and bundle.tensors[name].dtype == t.dtype
    assert bundle.catalog == catalog
    assert bundle.manifest.collab_dim == 4 and bundle.manifest.checksums


def test_a_changed_byte_is_caught(tmp_path):
    path, _, _ = _small(tmp_path)
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum of tensors.safetensors"):
        load_bundle(path)


def _edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_tampered_file_whose_checksum_entry_was_deleted_is_refused(tmp_path):
    path, _, _ = _small(tmp_path)
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    (path / "tensors.safetensors").write_bytes(bytes(data))
    _edit_manifest(path, lambda m: m["checksums"].pop("tensors.safetensors"))
    with pytest.raises(ArtifactError, match="no checksum for tensors.safetensors"):
        load_bundle(path)


def test_a_bundle_with_every_checksum_removed_is_refused(tmp_path):
    path, _, _ = _small(tmp_path)
    _edit_manifest(path, lambda m: m.update(checksums={}))
    with pytest.raises(ArtifactError, match="lists no checksum"):
        verify_bundle(path)


def test_a_file_the_manifest_does_not_list_is_refused(tmp_path):
    path, _, _ = _small(tmp_path)
    (path / "extra.safetensors").write_bytes(b"not listed")
    with pytest.raises(ArtifactError, match="extra.safetensors is not listed"):
        load_bundle(path)


def test_a_listed_file_that_is_missing_is_refused(tmp_path):
    path, _, _ = _small(tmp_path)
    _edit_manifest(path, lambda m: m["checksums"].update({"adapter/adapter_model.safetensors": "0" * 64}))
    with pytest.raises(ArtifactError, match="adapter/adapter_model.safetensors is listed .* but missing"):
        load_bundle(path)


def test_a_name_outside_the_bundle_is_refused(tmp_path):
    path, _, _ = _small(tmp_path)
    _edit_manifest(path, lambda m: m["checksums"].update({"../elsewhere": "0" * 64}))
    with pytest.raises(ArtifactError, match="outside the bundle"):
        verify_bundle(path)


def test_a_manifest_with_non_utf8_bytes_is_an_artifact_error(tmp_path):
    path, _, _ = _small(tmp_path)
    raw = (path / "manifest.json").read_bytes()
    (path / "manifest.json").write_bytes(raw[:20] + b"\xff\xfe" + raw[20:])
    with pytest.raises(ArtifactError, match="not UTF-8"):
        read_manifest(path)


def test_dimension_mismatch_names_the_tensor(tmp_path):
    path, _, _ = _small(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["collab_dim"] = 8
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"mf.users has shape \(3, 4\).*\(3, 8\)"):
        load_bundle(path)


def test_format_version_and_missing_manifest(tmp_path):
    path, _, _ = _small(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99"):
        read_manifest(path)
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        read_manifest(tmp_path / "nowhere")


def test_backbone_mismatch_is_refused_with_both_names(tiny_bundle_dir):
    manifest = load_bundle(tiny_bundle_dir).manifest
    other = BackboneInfo(spec="Qwen/Qwen2-7B", fingerprint="f" * 64, hidden_size=3584, model_type="qwen2")
    with pytest.raises(ArtifactError) as err:
        check_compatible(manifest, other, (1, 2))
    text = str(err.value)
    assert "Qwen/Qwen2-7B" in text and "d_L: artifact 64, model 3584" in text and "Yes/No" in text


def test_bundle_holds_no_pickle(tiny_bundle_dir):
    files = [p for p in tiny_bundle_dir.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".md"}
    for p in files:
        data = p.read_bytes()
        if p.suffix == ".safetensors":
            # An 8-byte little-endian header length (its first byte may be anything, 0x80
            # included), then that many bytes of JSON: never a pickle stream.
            size = int.from_bytes(data[:8], "little")
            assert json.loads(data[8 : 8 + size])
        else:
            assert not data.startswith(b"\x80")  # pickle protocol marker
    assert (tiny_bundle_dir / "adapter" / "adapter_model.safetensors").exists()
    assert load_file(tiny_bundle_dir / "adapter" / "adapter_model.safetensors")


def test_loaded_scorer_reproduces_the_saved_model(tiny_bundle_dir, tiny_backbone_dir):
    """Merged and unmerged LoRA score alike, and the LoRA is really applied."""
    merged = load_scorer(tiny_bundle_dir).scorer
    unmerged = load_scorer(tiny_bundle_dir, merge_adapter=False).scorer
    base, tok, _ = load_backbone(str(tiny_backbone_dir))
    bundle = load_bundle(tiny_bundle_dir)
    enc = [
        merged.encoder.prompt(scoring_prompt(merged.spec, ["Heat (1995)"], t)) for t in bundle.catalog.titles
    ]
    t = bundle.tables()
    vectors = merged.soft_vectors(t.users[:1].expand(len(enc), -1), t.items, t.semantic, len(enc))
    with torch.no_grad():
        a, b = merged.score(enc, vectors), unmerged.score(enc, vectors)
        ids = torch.tensor([enc[0].ids])
        lora_changes_output = not torch.allclose(
            base(input_ids=ids).logits, merged.backbone(input_ids=ids).logits
        )
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert lora_changes_output


def test_wrong_backbone_for_a_bundle_is_refused(tiny_bundle_dir, tmp_path, tokenizer):
    other = tmp_path / "other"
    random_backbone(factories.tiny_qwen2_config(hidden=32)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ArtifactError, match="backbone: artifact trained on .*; d_L: artifact 64, model 32"):
        load_scorer(tiny_bundle_dir, backbone=str(other))


def _without(src, dst, drop):
    """A copy of bundle `src` whose tensors lack those `drop` names, re-checksummed (so only the
    contract, not the integrity check, can catch it)."""
    shutil.copytree(src, dst)
    tensors = {k: v for k, v in load_file(dst / TENSORS).items() if not drop(k)}
    save_file(tensors, dst / TENSORS)
    manifest = Manifest.model_validate_json((dst / MANIFEST).read_text())
    manifest.checksums[TENSORS] = sha256_file(dst / TENSORS)
    (dst / MANIFEST).write_text(manifest.model_dump_json())
    return dst


def test_a_bundle_missing_what_its_prompt_needs_is_not_written(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    tensors = {k: v for k, v in bundle.tensors.items() if not k.startswith(PROJ_W + ".")}
    with pytest.raises(ArtifactError, match="has <Warm_ID> but it holds no proj_w"):
        save_bundle(tmp_path / "cut", bundle.manifest, tensors, bundle.catalog)
    assert not (tmp_path / "cut").exists()


def test_a_bundle_cut_short_is_refused_by_the_loader_and_before_serving(tiny_bundle_dir, tmp_path):
    cut = _without(tiny_bundle_dir, tmp_path / "cut", lambda k: k == MF_USERS)
    verify_bundle(cut)  # the files are intact
    for check in (load_bundle, check_servable):
        with pytest.raises(
            ArtifactError, match="has <User_ID> but it holds no mf.users; the bundle is refused"
        ):
            check(cut)


def _poisoned(src, dst, file, value):
    """A copy of bundle `src` with one entry of the first tensor of `file` set to `value`,
    re-checksummed: what a diverged training run would have written."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / file)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = value
    save_file(tensors, dst / file)
    manifest = Manifest.model_validate_json((dst / MANIFEST).read_text())
    manifest.checksums[file] = sha256_file(dst / file)
    (dst / MANIFEST).write_text(manifest.model_dump_json())
    return dst, name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_bundle_with_nonfinite_tables_is_not_written(tmp_path, value):
    path, tensors, catalog = _small(tmp_path)
    manifest = load_bundle(path).manifest
    tensors[MF_ITEMS][1, 2] = value
    expected = "not written, tensors.safetensors holds NaN or infinite values in mf.items"
    with pytest.raises(ArtifactError, match=expected):
        save_bundle(tmp_path / "diverged", manifest, tensors, catalog)
    assert not (tmp_path / "diverged").exists()


@pytest.mark.parametrize("file", [TENSORS, ADAPTER_WEIGHTS])
def test_a_bundle_holding_nan_is_refused_by_the_loader(tiny_bundle_dir, tmp_path, file):
    load_bundle(tiny_bundle_dir)  # the original loads
    poisoned, name = _poisoned(tiny_bundle_dir, tmp_path / "nan", file, float("nan"))
    verify_bundle(poisoned)  # the checksums agree: only the finiteness check can catch it
    with pytest.raises(ArtifactError, match=f"{file} holds NaN or infinite values in {name} .*refused"):
        load_bundle(poisoned)
    with pytest.raises(ArtifactError, match="NaN or infinite"):
        load_scorer(poisoned)


def test_check_servable_passes_an_llm_bundle_and_refuses_one_without_an_llm(tiny_bundle_dir, tmp_path):
    assert check_servable(tiny_bundle_dir).variant == "sellarec"
    path, _, _ = _small(tmp_path)
    with pytest.raises(ArtifactError, match="'sellarec' bundle without a backbone .* has no LLM to serve"):
        check_servable(path)


def test_typed_views_of_a_bundle(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    tables = bundle.tables()
    assert tables.users.shape == (6, 16) and tables.semantic.shape == (10, 64)
    projections = bundle.projections()
    assert projections.llm_dim == 64 and projections.uses_collab and projections.uses_semantic
    small = load_bundle(_small(tmp_path)[0])
    assert small.tables().neutral_user is None and small.tables().users.shape == (3, 4)


def test_model_identity_round_trips_and_names_every_difference(tiny_bundle_dir):
    identity = ModelIdentity.of(load_bundle(tiny_bundle_dir).manifest)
    assert ModelIdentity.from_dict(json.loads(json.dumps(identity.to_dict()))) == identity
    older = {k: v for k, v in identity.to_dict().items() if k != "backbone_spec"} | {"unknown": 1}
    assert ModelIdentity.from_dict(older).problems(identity) == []  # the spec is never compared
    other = dataclasses.replace(
        identity, backbone="0" * 64, collab_dim=8, template="{}", answer_ids=(1, 2), adapter="f" * 64
    )
    text = "; ".join(identity.problems(other))
    for part in ("backbone: artifact trained on", "d_C: artifact 8, model 16", "Yes/No token ids",
                 "prompt template", "LoRA weights: artifact ffffffffffff"):  # fmt: skip
        assert part in text
