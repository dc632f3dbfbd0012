import json

import pytest
from transformers.utils.quantization_config import QuantizationConfigMixin

from sqakd_hf import QuantConfig


def test_round_trip_exact_and_json_safe():
    cfg = QuantConfig(
        method="ewgs", weight_bits=2, act_bits=4, weight_granularity="per_tensor", ewgs_delta=0.01,
        modules_to_not_convert=["^conv1$", "fc"], layer_bits={"layer4": 8, "attn": {"act_bits": 8}},
    )
    d = cfg.to_dict()
    assert d["quant_method"] == "sqakd"
    assert d["layer_bits"] == {"layer4": {"weight_bits": 8, "act_bits": 8}, "attn": {"act_bits": 8}}
    again = QuantConfig(**json.loads(json.dumps(d)))
    assert again.to_dict() == d
    assert QuantConfig.from_dict(d).to_dict() == d
    assert isinstance(cfg, QuantizationConfigMixin)


def test_bits_for_applies_first_matching_override():
    cfg = QuantConfig(weight_bits=4, act_bits=4, layer_bits={"attn": {"act_bits": 8}, "attn.q": 2})
    assert cfg.bits_for("blocks.0.attn.qkv") == {"weight_bits": 4, "act_bits": 8}
    assert cfg.bits_for("blocks.0.mlp.fc1") == {"weight_bits": 4, "act_bits": 4}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weight_bits": 0}, "weight_bits"),
        ({"act_bits": 9}, "act_bits"),
        ({"act_bits": 16}, "act_bits"),
        ({"weight_bits": 4.0}, "weight_bits"),
        ({"method": "gptq"}, "method"),
        ({"weight_granularity": "per_group"}, "weight_granularity"),
        ({"ewgs_delta": -1}, "ewgs_delta"),
        ({"ewgs_delta": float("nan")}, "ewgs_delta"),
        ({"ewgs_delta": float("inf")}, "ewgs_delta"),
        ({"modules_to_not_convert": "fc"}, "modules_to_not_convert"),
        ({"modules_to_not_convert": ["("]}, "modules_to_not_convert"),
        ({"layer_bits": {"fc": 3.5}}, "layer_bits"),
        ({"layer_bits": {"fc": {"bits": 4}}}, "layer_bits"),
        ({"quant_method": "gptq"}, "quant_method"),
        ({"wbits": 4}, "unknown field"),
        ({"act_granularity": "per_channel"}, "act_granularity"),
        ({"smooth_alpha": 0}, "smooth_alpha"),
        ({"smooth_alpha": 1.5}, "smooth_alpha"),
        ({"smooth_alpha": "0.5"}, "smooth_alpha"),
        ({"smooth_alpha": True}, "smooth_alpha"),
        ({"embedding_bits": 0}, "embedding_bits"),
        ({"embedding_bits": 16}, "embedding_bits"),
        ({"embedding_bits": 8.0}, "embedding_bits"),
    ],
)
def test_bad_values_name_the_field_and_allowed_values(kwargs, field):
    with pytest.raises(ValueError, match=field) as e:
        QuantConfig(**kwargs)
    msg = str(e.value)
    if "bits" in field and field != "layer_bits":
        assert "1..8" in msg and ("32" in msg or field == "embedding_bits")
    if field == "method":
        assert "lsq" in msg and "ewgs" in msg


def test_short_name():
    assert QuantConfig(method="pact", weight_bits=2, act_bits=2).short_name == "pact-W2A2"


def test_activation_smoothing_and_embedding_fields_round_trip_and_compatibility():
    from sqakd_hf.config import check_config_compatible

    cfg = QuantConfig(act_granularity="per_tensor", smooth_alpha=0.5, embedding_bits=8)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert (d["act_granularity"], d["smooth_alpha"], d["embedding_bits"]) == ("per_tensor", 0.5, 8)
    assert QuantConfig(**d).to_dict() == cfg.to_dict()
    assert QuantConfig().act_granularity == "per_token" and QuantConfig().embedding_bits is None
    # the granularity and the embedding bits change the function; smooth_alpha only how calibration started
    check_config_compatible(cfg, QuantConfig(act_granularity="per_tensor", embedding_bits=8))
    for other in (QuantConfig(smooth_alpha=0.5, embedding_bits=8), QuantConfig(act_granularity="per_tensor",
                                                                               smooth_alpha=0.5, embedding_bits=4)):
        with pytest.raises(ValueError, match="act_granularity|embedding_bits"):
            check_config_compatible(cfg, other)


def test_a_saved_config_without_act_granularity_reads_as_per_tensor():
    """Checkpoints written before per-token activations existed were quantized per tensor."""
    old = {k: v for k, v in QuantConfig().to_dict().items() if k != "act_granularity"}
    assert QuantConfig.from_dict(old).act_granularity == "per_tensor"
    assert QuantConfig(**old).act_granularity == "per_token"  # a new config gets the default
    assert QuantConfig.from_dict(QuantConfig().to_dict()).act_granularity == "per_token"
