from __future__ import annotations

import factories
import pytest
import torch

from sellarec.model.backbone import SMOLLM2_ALIAS, fetch_smollm2


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return factories.tokenizer()


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    return factories.tiny_backbone_dir(tmp_path_factory.mktemp("backbone"))


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory, tiny_backbone_dir):
    return factories.make_bundle(tmp_path_factory.mktemp("bundle"), tiny_backbone_dir)


@pytest.fixture(scope="session")
def smollm2_dir():
    return fetch_smollm2()


@pytest.fixture(scope="session")
def smollm2_spec(smollm2_dir):
    return SMOLLM2_ALIAS
