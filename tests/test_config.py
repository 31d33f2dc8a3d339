import pytest

from mlx_trm.config import ConfigError, ModelConfig, load_config, parse_override
from tests.conftest import CONFIGS


def test_every_reference_config_loads():
    names = sorted(p.stem for p in CONFIGS.glob("trm_tinystories_*.yaml"))
    assert names == [
        "trm_tinystories_10m_moeut", "trm_tinystories_1m", "trm_tinystories_1m_flat",
        "trm_tinystories_1m_moeut", "trm_tinystories_1m_moeut_act",
        "trm_tinystories_1m_moeut_noact", "trm_tinystories_1m_noact",
        "trm_tinystories_1m_noact_1l",
    ]
    for name in names:
        config = load_config(CONFIGS / f"{name}.yaml")
        assert config.model.name == name


def test_reference_layer_applications():
    apps = {
        "trm_tinystories_1m_flat": 6, "trm_tinystories_1m": 14, "trm_tinystories_1m_noact": 16,
        "trm_tinystories_1m_noact_1l": 4, "trm_tinystories_1m_moeut": 16,
        "trm_tinystories_1m_moeut_act": 16, "trm_tinystories_1m_moeut_noact": 50,
        "trm_tinystories_10m_moeut": 10,
    }
    for name, n in apps.items():
        assert load_config(CONFIGS / f"{name}.yaml").model.layer_applications_per_act_step == n


def test_overrides_apply_with_types():
    config = load_config(CONFIGS / "trm_tinystories_1m.yaml",
                         ["train.max_steps=200", "train.lr=3e-3", "model.halt_max_steps=8",
                          "data.path=/tmp/stories.txt", "out_dir=runs/x", "train.lr_min_ratio=1"])
    assert config.train.max_steps == 200
    assert config.train.lr == pytest.approx(3e-3)
    assert isinstance(config.train.lr_min_ratio, float)
    assert config.model.halt_max_steps == 8
    assert config.data.path == "/tmp/stories.txt"
    assert config.out_dir == "runs/x"


def test_unknown_key_suggests_nearest_names():
    with pytest.raises(ConfigError, match="did you mean halt_max_steps"):
        load_config(CONFIGS / "trm_tinystories_1m.yaml", ["model.halt_max_step=2"])
    with pytest.raises(ConfigError, match="did you mean train"):
        load_config(None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match="needs a section"):
        parse_override("lr=1")
    with pytest.raises(ConfigError, match="not key=value"):
        parse_override("train.lr")


def test_wrong_types_and_impossible_values_are_rejected():
    with pytest.raises(ConfigError, match="train.max_steps must be int"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="model.flat_transformer must be bool"):
        load_config(None, ["model.flat_transformer=3"])
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        load_config(None, ["model.hidden_size=64", "model.num_heads=3"])
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        load_config(None, ["train.global_batch_size=10", "train.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")
    with pytest.raises(ConfigError, match="causal"):
        ModelConfig(causal=False).validate()
