"""DiffusionQuantConfig: defaults, profiles, validation, YAML, environment, precedence."""

from __future__ import annotations

import dataclasses

import pytest

from arrowquant.config import (
    ENV_FIELDS,
    DiffusionQuantConfig,
    parse_bits_for,
    resolve,
)
from arrowquant.errors import ConfigurationError

# The first version's fields this version reads (its calibration_samples and
# enable_streaming were read by nothing and are accepted, then ignored:
# test_one_path.py). group_size was 128 until issue 18's measurements on real
# outputs (docs/quality.md): INT4 now defaults to groups of 32 with superblock
# parameters.
FIRST_VERSION_DEFAULTS = dict(
    bit_width=4, modality=None, num_time_groups=10, group_size=32, enable_time_aware=True,
    enable_spatial=True, min_accuracy=0.85, deployment_profile="local",
    fail_fast=False, num_threads=0, max_memory_limit_mb=None,
    enable_mixed_precision=False, skip_sensitive_layers=False,
)


def test_defaults_are_the_first_versions():
    cfg = DiffusionQuantConfig()
    for k, v in FIRST_VERSION_DEFAULTS.items():
        assert getattr(cfg, k) == v, k
    # Method and parameter precision: the measured defaults of docs/quality.md.
    assert cfg.scheme == "asymmetric" and cfg.method == "rtn" and cfg.param_dtype == "superblock"
    assert cfg.target_bpw is None and cfg.keep_patterns == [] and cfg.bits_for == {}
    assert cfg.fallback_thresholds == {2: 0.70, 4: 0.90, 8: 0.95}
    assert cfg.quantize_1d is False
    cfg.validate()
    # Attributes are writable.
    cfg.bit_width = 8
    assert cfg.bit_width == 8


def test_field_order_starts_with_first_version_fields():
    names = [f.name for f in dataclasses.fields(DiffusionQuantConfig)]
    assert names[:len(FIRST_VERSION_DEFAULTS)] == list(FIRST_VERSION_DEFAULTS)


@pytest.mark.parametrize("name,expect", [
    ("edge", dict(bit_width=2, num_time_groups=5, group_size=16, method="mse",
                  param_dtype="superblock", enable_spatial=False, min_accuracy=0.65,
                  enable_time_aware=True)),
    ("local", dict(bit_width=4, num_time_groups=10, group_size=32, method="rtn",
                   param_dtype="superblock", enable_spatial=True, min_accuracy=0.85,
                   enable_time_aware=True)),
    ("cloud", dict(bit_width=8, num_time_groups=20, group_size=64, method="mse",
                   param_dtype="float16", enable_spatial=True, min_accuracy=0.95)),
    ("base", dict(bit_width=4, enable_time_aware=False, enable_spatial=False)),
])
def test_profiles(name, expect):
    cfg = DiffusionQuantConfig.from_profile(name)
    assert cfg.deployment_profile == name
    for k, v in expect.items():
        assert getattr(cfg, k) == v, (name, k)


@pytest.mark.parametrize("overrides,expect", [
    ({}, (4, 32, "rtn", "superblock")),
    ({"bit_width": 2}, (2, 16, "mse", "superblock")),
    ({"bit_width": 8}, (8, 64, "mse", "float16")),
    # float16 parameters asked for: twice the group, the same bits per weight
    ({"param_dtype": "float16"}, (4, 64, "rtn", "float16")),
    ({"scheme": "symmetric"}, (4, 64, "rtn", "float16")),
    ({"group_size": 128}, (4, 128, "rtn", "superblock")),
    ({"method": "mse", "bit_width": 8}, (8, 64, "mse", "float16")),
    ({"bit_width": 2, "method": "rtn", "group_size": 64, "param_dtype": "float32"},
     (2, 64, "rtn", "float32")),
])
def test_spec_fields_follow_the_bit_width(overrides, expect):
    """What the user does not set comes from spec.default_spec(final bit width)."""
    cfg = resolve(overrides=overrides, environ={})
    assert (cfg.bit_width, cfg.group_size, cfg.method, cfg.param_dtype) == expect
    # set through the environment, the width is followed the same way
    env = resolve(environ={"ARROW_QUANT_BIT_WIDTH": "2"})
    assert (env.group_size, env.method, env.param_dtype) == (16, "mse", "superblock")
    kept = resolve(environ={"ARROW_QUANT_BIT_WIDTH": "2", "ARROW_QUANT_GROUP_SIZE": "128"})
    assert (kept.group_size, kept.method) == (128, "mse")


def test_profile_with_overrides_and_unknown_profile():
    cfg = DiffusionQuantConfig.from_profile("edge", group_size=64)
    assert cfg.bit_width == 2 and cfg.group_size == 64
    with pytest.raises(ConfigurationError, match="edge, local, cloud, base"):
        DiffusionQuantConfig.from_profile("phone")


@pytest.mark.parametrize("field,value,message", [
    ("bit_width", 3, "bit_width must be one of 2, 4, 8"),
    ("bit_width", True, "bit_width must be one of"),
    ("modality", "video", "modality must be one of 'text', 'code', 'image', 'audio'"),
    ("num_time_groups", 0, "num_time_groups must be an integer from 1 to 1000"),
    ("group_size", -1, "group_size must be an integer from 1"),
    ("group_size", 12.5, "group_size must be an integer"),
    ("min_accuracy", 1.5, r"min_accuracy must be a number from 0.0 to 1.0"),
    ("num_threads", -2, r"num_threads must be an integer from 0 to 4096 \(0 = all cores\)"),
    ("max_memory_limit_mb", 0, "max_memory_limit_mb must be an integer from 1"),
    ("deployment_profile", "phone", "deployment_profile must be one of 'edge', 'local'"),
    ("fail_fast", "yes", "fail_fast must be true or false"),
    ("scheme", "affine", "scheme must be one of 'asymmetric', 'symmetric'"),
    ("method", "gptq", "method must be one of"),
    ("param_dtype", "bfloat16", "param_dtype must be one of 'float32', 'float16'"),
    ("target_bpw", 2.0, "target_bpw must be a number above 2"),
    ("target_bpw", 40, "at most 32"),
    ("keep_patterns", ["re:(unclosed"], "bad regular expression"),
    ("bits_for", {"*.attn*": 3}, r"bits_for\['\*.attn\*'\] must be one of 2, 4, 8 or 16"),
    ("fallback_thresholds", {3: 0.5}, "fallback_thresholds keys must be bit widths"),
    ("fallback_thresholds", {4: 1.5}, r"fallback_thresholds\[4\] must be a number from 0.0"),
])
def test_validate_says_what_is_allowed(field, value, message):
    cfg = DiffusionQuantConfig()
    setattr(cfg, field, value)
    with pytest.raises(ConfigurationError, match=message):
        cfg.validate()


def test_from_dict_rejects_unknown_keys_listing_allowed_ones():
    with pytest.raises(ConfigurationError, match="unknown configuration key.*'bitwidth'.*allowed keys: bit_width"):
        DiffusionQuantConfig.from_dict({"bitwidth": 4})


def test_yaml_round_trip(tmp_path):
    cfg = DiffusionQuantConfig.from_profile(
        "cloud", target_bpw=5.5, keep_patterns=["*.norm*", "re:^lm_head"],
        bits_for={"*time_emb*": 8, "re:attn\\d": 16}, fallback_thresholds={2: 0.6, 4: 0.88, 8: 0.97},
        max_memory_limit_mb=2048, modality="image", skip_sensitive_layers=True,
        scheme="symmetric", param_dtype="float16", quantize_1d=True)
    path = tmp_path / "q.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text
    back = DiffusionQuantConfig.from_yaml(path)
    assert back == cfg
    assert list(back.bits_for) == ["*time_emb*", "re:attn\\d"]  # order kept: first match wins


def test_yaml_partial_file_uses_its_profile(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("deployment_profile: edge\ngroup_size: 64\n")
    cfg = DiffusionQuantConfig.from_yaml(path)
    assert cfg.bit_width == 2 and cfg.group_size == 64 and cfg.min_accuracy == 0.65


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bit_width: [4\n")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        DiffusionQuantConfig.from_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 4\n- 8\n")
    with pytest.raises(ConfigurationError, match="must hold a mapping"):
        DiffusionQuantConfig.from_yaml(lst)
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        DiffusionQuantConfig.from_yaml(tmp_path / "missing.yaml")
    out_of_range = tmp_path / "range.yaml"
    out_of_range.write_text("bit_width: 5\n")
    with pytest.raises(ConfigurationError, match="bit_width must be one of 2, 4, 8; got 5"):
        DiffusionQuantConfig.from_yaml(out_of_range)


def test_env_overrides_every_variable():
    env = {
        "ARROW_QUANT_BIT_WIDTH": "8", "ARROW_QUANT_GROUP_SIZE": "64",
        "ARROW_QUANT_NUM_TIME_GROUPS": "7", "ARROW_QUANT_MIN_ACCURACY": "0.9",
        "ARROW_QUANT_FAIL_FAST": "yes",
        "ARROW_QUANT_NUM_THREADS": "2", "ARROW_QUANT_MAX_MEMORY_MB": "512",
        "ARROW_QUANT_PARAM_DTYPE": "superblock", "ARROW_QUANT_METHOD": "grid-learned",
        "UNRELATED": "x",
    }
    assert set(env) - {"UNRELATED"} == set(ENV_FIELDS)
    base = DiffusionQuantConfig()
    cfg = DiffusionQuantConfig.from_env(env)
    assert (cfg.bit_width, cfg.group_size, cfg.num_time_groups, cfg.min_accuracy,
            cfg.fail_fast, cfg.num_threads,
            cfg.max_memory_limit_mb, cfg.param_dtype, cfg.method) == (
                8, 64, 7, 0.9, True, 2, 512, "superblock", "grid-learned")
    assert base.bit_width == 4  # apply_env returns a copy
    assert base.apply_env({"ARROW_QUANT_FAIL_FAST": "off"}).fail_fast is False
    assert base.apply_env({"ARROW_QUANT_BIT_WIDTH": "  "}).bit_width == 4  # empty: ignored


def test_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv("ARROW_QUANT_GROUP_SIZE", "32")
    assert DiffusionQuantConfig.from_env().group_size == 32


@pytest.mark.parametrize("var,value,message", [
    ("ARROW_QUANT_BIT_WIDTH", "four", r"ARROW_QUANT_BIT_WIDTH='four' is not an integer"),
    ("ARROW_QUANT_BIT_WIDTH", "3", "bit_width must be one of 2, 4, 8; got 3"),
    ("ARROW_QUANT_MIN_ACCURACY", "high", "ARROW_QUANT_MIN_ACCURACY='high' is not a number"),
    ("ARROW_QUANT_FAIL_FAST", "maybe", "ARROW_QUANT_FAIL_FAST='maybe' is not a boolean"),
    ("ARROW_QUANT_MAX_MEMORY_MB", "1.5G", "ARROW_QUANT_MAX_MEMORY_MB='1.5G' is not an integer"),
    ("ARROW_QUANT_GROUP_SIZE", "0", "group_size must be an integer from 1"),
])
def test_env_errors_are_clear(var, value, message):
    with pytest.raises(ConfigurationError, match=message):
        DiffusionQuantConfig.from_env({var: value})


def test_resolve_precedence(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("bit_width: 2\ngroup_size: 32\nnum_time_groups: 3\nmin_accuracy: 0.5\n")
    env = {"ARROW_QUANT_GROUP_SIZE": "64", "ARROW_QUANT_NUM_TIME_GROUPS": "4"}
    cfg = resolve(config_file=path, profile="cloud", environ=env,
                  overrides={"num_time_groups": 6, "bit_width": None})
    assert cfg.deployment_profile == "cloud"
    assert cfg.enable_spatial is True          # profile only
    assert cfg.bit_width == 2                  # file over profile (None override skipped)
    assert cfg.min_accuracy == 0.5             # file over profile
    assert cfg.group_size == 64                # env over file
    assert cfg.num_time_groups == 6            # flag over env


def test_resolve_defaults_and_file_profile(tmp_path):
    assert resolve(environ={}) == DiffusionQuantConfig()
    path = tmp_path / "q.yaml"
    path.write_text("deployment_profile: edge\n")
    assert resolve(config_file=path, environ={}).bit_width == 2
    # An explicit profile wins over the file's profile name.
    assert resolve(config_file=path, profile="cloud", environ={}).bit_width == 8


def test_resolve_validates_the_result_once():
    # A file/env value may be invalid on its own only if a later layer fixes it.
    cfg = resolve(environ={"ARROW_QUANT_BIT_WIDTH": "3"}, overrides={"bit_width": 4})
    assert cfg.bit_width == 4
    with pytest.raises(ConfigurationError, match="bit_width"):
        resolve(environ={"ARROW_QUANT_BIT_WIDTH": "3"})


def test_parse_bits_for():
    rules = parse_bits_for(["*.attn*=8", "re:a=b=2", "lm_head=fp16", "x=keep"])
    assert rules == {"*.attn*": 8, "re:a=b": 2, "lm_head": 16, "x": 16}
    with pytest.raises(ConfigurationError, match="PATTERN=BITS"):
        parse_bits_for(["noequals"])
    with pytest.raises(ConfigurationError, match="BITS must be 2, 4, 8 or 16"):
        parse_bits_for(["x=3"])
    with pytest.raises(ConfigurationError, match="BITS must be 2, 4, 8 or 16"):
        parse_bits_for(["x=high"])
    # The CLI can pass the list straight through resolve().
    cfg = resolve(environ={}, overrides={"bits_for": ["*.conv*=8"], "keep_patterns": "*norm*"})
    assert cfg.bits_for == {"*.conv*": 8} and cfg.keep_patterns == ["*norm*"]


def test_mixed_precision_flag_and_min_cosine():
    cfg = DiffusionQuantConfig()
    assert not cfg.mixed_precision
    assert cfg.copy(target_bpw=3.0).mixed_precision
    assert cfg.copy(enable_mixed_precision=True).mixed_precision
    assert cfg.min_cosine(4) == 0.90
    assert cfg.copy(fallback_thresholds={2: 0.0, 4: 0.9, 8: 0.95}).min_cosine(2) is None
