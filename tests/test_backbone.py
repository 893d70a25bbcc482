"""The real SmolLM2-135M-Instruct backbone: GGUF fetch, conversion, scoring, LoRA."""

from __future__ import annotations

import pytest
import torch

from sellarec.model.backbone import BackboneNotFound, load_backbone
from sellarec.model.lora import LoraSettings, attach_lora, merge
from sellarec.model.prompts import TemplateSpec, scoring_prompt
from sellarec.model.sella import SellaRec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_spec):
    return load_backbone(smollm2_spec)


def test_smollm2_has_the_documented_shape(smollm2):
    model, tokenizer, info = smollm2
    config = model.config
    assert (info.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert info.model_type == "llama" and len(info.fingerprint) == 64
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert not any(p.requires_grad for p in model.parameters())


def test_smollm2_scores_a_prompt_like_its_full_vocabulary(smollm2):
    model, tokenizer, _ = smollm2
    scorer = SellaRec(model, tokenizer, TemplateSpec(stage="stage1"))
    prompt = scoring_prompt(scorer.spec, ["Toy Story (1995)", "Babe (1995)"], "Jumanji (1995)")
    encoded = scorer.encoder.prompt(prompt)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded.ids])).logits[0, -1]
        p = torch.sigmoid(scorer.score([encoded]))[0].item()
    ref = torch.softmax(logits[[scorer.head.yes_id, scorer.head.no_id]], 0)[0].item()
    assert p == pytest.approx(ref, abs=1e-5)
    # A pretrained model puts real mass on the answers after the cue.
    assert torch.softmax(logits, 0)[[scorer.head.yes_id, scorer.head.no_id]].sum() > 0.05


def test_lora_attaches_trains_and_merges(smollm2):
    model, tokenizer, _ = smollm2
    ids = torch.tensor([tokenizer("Movie: Heat (1995)").input_ids])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    peft = attach_lora(model, LoraSettings())
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    peft.eval()  # LoRA dropout off
    with torch.no_grad():
        adapted = peft(input_ids=ids).logits
        merged_model = merge(peft)
        merged = merged_model(input_ids=ids).logits
    assert not torch.allclose(before, adapted)
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)


def test_missing_backbone_says_how_to_get_one():
    with pytest.raises(BackboneNotFound, match="smollm2-135m-instruct"):
        load_backbone("/no/such/backbone")


def test_converting_the_backbone_leaves_the_callers_random_stream_alone(tmp_path, monkeypatch):
    # A first run on a machine converts the GGUF (building a model draws random weights); a
    # later run reads the converted copy. A seed set before the load must mean the same in both.
    from sellarec.model import backbone

    def download(workdir):
        (workdir / "gguf").mkdir()
        (workdir / "gguf" / backbone.SMOLLM2_GGUF).write_bytes(b"gguf")
        return workdir / "gguf"

    def convert(gguf_dir, out):
        torch.nn.Linear(64, 64)  # initialises like the real conversion's from_config
        out.mkdir()

    monkeypatch.setattr(backbone, "_download_gguf", download)
    monkeypatch.setattr(backbone, "_convert_gguf", convert)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    target = backbone.fetch_smollm2(tmp_path)
    assert (target / backbone._INFO_FILE).exists()
    assert torch.equal(torch.rand(4), expected)
