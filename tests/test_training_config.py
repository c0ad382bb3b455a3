"""TrainConfig validation (errors name the flag), config files with flag overrides, the price table."""
from __future__ import annotations

import json

import pytest

from loradex.hub.errors import InvalidConfig, InvalidName
from loradex.training import TrainConfig
from loradex.training.config import load_config
from loradex.training.cost import estimate_cost, price_table

OK = dict(data="train.jsonl", name="my-adapter")


def test_defaults_follow_the_seed():
    c = TrainConfig(**OK)
    assert (c.base, c.r, c.alpha, c.dropout, c.targets) == ("smollm2-135m-instruct", 16, 32.0, 0.05, "q_proj,v_proj")
    assert (c.learning_rate, c.lr_scheduler, c.warmup_ratio, c.epochs, c.max_steps) == (2e-4, "cosine", 0.05, 1.0, -1)
    assert (c.quantize, c.precision, c.device, c.gpu_type, c.resume) == ("nf4", "auto", "auto", "a10g", False)
    assert c.target_list() == ["q_proj", "v_proj"]
    assert TrainConfig(**OK, targets="all-linear").target_list() == "all-linear"


@pytest.mark.parametrize("field,value,flag", [
    ("r", 0, "--r"), ("batch_size", 0, "--batch-size"), ("grad_accum", -1, "--grad-accum"),
    ("learning_rate", 0, "--learning-rate"), ("lr_scheduler", "cosmic", "--lr-scheduler"),
    ("warmup_ratio", 1.5, "--warmup-ratio"), ("quantize", "int8", "--quantize"), ("precision", "fp8", "--precision"),
    ("dropout", 1.0, "--dropout"), ("max_length", 4, "--max-length"), ("targets", " , ", "--targets"),
    ("device", "tpu", "--device"), ("gpu_type", "abacus", "--gpu-type"), ("max_steps", 0, "--max-steps"),
    ("epochs", 0, "--epochs"), ("threads", -1, "--threads"), ("save_steps", 0, "--save-steps"),
    ("data", "", "--data"), ("alpha", -2, "--alpha"),
])
def test_bad_values_name_the_flag(field, value, flag):
    with pytest.raises(InvalidConfig) as err:
        TrainConfig(**{**OK, field: value})
    assert flag in str(err.value)


def test_bad_name_is_refused():
    with pytest.raises((InvalidName, InvalidConfig)):
        TrainConfig(data="x.jsonl", name="no spaces allowed")


def test_yaml_and_json_files_with_flag_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("data: a.jsonl\nname: from-file\nr: 8\nlearning-rate: 0.001\n")
    c = load_config(y, r=4, name=None)
    assert c.name == "from-file" and c.r == 4 and c.learning_rate == 1e-3  # flags win, unset flags do not
    j = tmp_path / "run.json"
    j.write_text(json.dumps({**TrainConfig(**OK).to_dict(), "resolved": {"device": "cpu"}}))
    assert load_config(j) == TrainConfig(**OK)  # a saved resolved config loads back


def test_config_file_errors(tmp_path):
    with pytest.raises(InvalidConfig, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(InvalidConfig, match="cannot parse"):
        load_config(bad)
    unknown = tmp_path / "u.json"
    unknown.write_text(json.dumps({**OK, "lora_rank": 8}))
    with pytest.raises(InvalidConfig, match="unknown field.*lora_rank"):
        load_config(unknown)


def test_price_table_is_editable(tmp_path):
    assert price_table(tmp_path)["a10g"] == pytest.approx(1.10)
    (tmp_path / "prices.json").write_text(json.dumps({"a10g": 2.0, "my-box": 0.25}))
    table = price_table(tmp_path)
    assert table["a10g"] == 2.0 and table["my-box"] == 0.25 and "h100" in table
    cost, basis = estimate_cost(1800, "cuda", "A10G", tmp_path)
    assert cost == pytest.approx(1.0) and basis == {"device_type": "a10g", "usd_per_hour": 2.0}
    cost, basis = estimate_cost(3600, "cpu", "a10g", tmp_path)
    assert basis["device_type"] == "cpu" and cost == pytest.approx(table["cpu"])
    (tmp_path / "prices.json").write_text(json.dumps({"a10g": -1}))
    with pytest.raises(InvalidConfig, match="prices.json"):
        price_table(tmp_path)
