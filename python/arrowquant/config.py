"""DiffusionQuantConfig: every setting of a quantization run in one object,
(kept whole: one object's fields, profiles, files, environment and resolution)
with deployment profiles, validation, YAML files and ARROW_QUANT_* environment
overrides.

Precedence (lowest to highest), as implemented by `resolve()`:

1. the profile: `profile=` when given, else the file's `deployment_profile`
   key, else "local";
2. the YAML file (`config_file=`): only the keys it names;
3. the environment: ARROW_QUANT_BIT_WIDTH, ARROW_QUANT_GROUP_SIZE,
   ARROW_QUANT_NUM_TIME_GROUPS, ARROW_QUANT_MIN_ACCURACY, ARROW_QUANT_FAIL_FAST,
   ARROW_QUANT_NUM_THREADS, ARROW_QUANT_MAX_MEMORY_MB, ARROW_QUANT_PARAM_DTYPE,
   ARROW_QUANT_METHOD
   (an empty variable is ignored);
4. explicit overrides (the CLI's flags): keys whose value is None are ignored,
   so a CLI can pass every flag and let unset ones fall through.

The result is validated once, at the end, so that a file may rely on a later
override to become valid.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from .errors import ConfigurationError
from .spec import (DEFAULT_SPEC, VALID_BITS, VALID_METHODS, VALID_PARAM_DTYPES, VALID_SCHEMES,
                   WIDTH_FIELDS, QuantSpec, default_spec)
from .text import decode_text

MODALITIES = ("text", "code", "image", "audio")
#: Minimum cosine similarity per bit width below which a layer is redone at the
#: next width (fallback_thresholds, --fallback-threshold).
DEFAULT_MIN_COSINE: Dict[int, float] = {2: 0.70, 4: 0.90, 8: 0.95}
#: Bits a --bits-for rule may name: the quantized widths, or 16 = keep unquantized.
RULE_BITS = (2, 4, 8, 16)
KEEP_BITS = 16

#: Settings of each deployment profile; fields not named keep the dataclass
#: default, and group size, method and parameter storage follow the bit width
#: (spec.default_spec) unless set.
PROFILES: Dict[str, Dict[str, Any]] = {
    "edge": dict(bit_width=2, num_time_groups=5, enable_spatial=False, min_accuracy=0.65),
    "local": dict(bit_width=4, num_time_groups=10, enable_spatial=True, min_accuracy=0.85),
    "cloud": dict(bit_width=8, num_time_groups=20, enable_spatial=True, min_accuracy=0.95),
    "base": dict(bit_width=4, enable_time_aware=False, enable_spatial=False),
}
#: deployment_profile may also say "custom" (a config not made from a profile).
PROFILE_NAMES = tuple(PROFILES) + ("custom",)

#: environment variable -> field
ENV_FIELDS: Dict[str, str] = {
    "ARROW_QUANT_BIT_WIDTH": "bit_width",
    "ARROW_QUANT_GROUP_SIZE": "group_size",
    "ARROW_QUANT_NUM_TIME_GROUPS": "num_time_groups",
    "ARROW_QUANT_MIN_ACCURACY": "min_accuracy",
    "ARROW_QUANT_FAIL_FAST": "fail_fast",
    "ARROW_QUANT_NUM_THREADS": "num_threads",
    "ARROW_QUANT_MAX_MEMORY_MB": "max_memory_limit_mb",
    "ARROW_QUANT_PARAM_DTYPE": "param_dtype",
    "ARROW_QUANT_METHOD": "method",
}

#: Settings of the first version that nothing reads: accepted in files and
#: mappings (with a warning) so that old configs still load, then dropped.
V1_IGNORED = ("calibration_samples", "enable_streaming")
V1_IGNORED_ENV = ("ARROW_QUANT_CALIBRATION_SAMPLES",)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass
class DiffusionQuantConfig:
    """Settings of a quantization run. All fields are plain attributes.

    The first thirteen are those of the first version of the system (its
    calibration_samples and enable_streaming, which nothing read, are accepted
    and ignored: V1_IGNORED); the rest
    are this version's additions:

    - `scheme`, `method`, `param_dtype`: how each group is quantized
      (FORMAT.md section 2) and the precision its scale/zero point are stored in.
    - `target_bpw`: average bits per weight over all floating-point weights
      of the model, group parameters included; turns on per-layer bit
      allocation (arrowquant.diffusion.DiffusionPlanner).
      `enable_mixed_precision` without `target_bpw` allocates at the budget of
      uniform `bit_width` (same size, less error).
    - `keep_patterns`: tensors never quantized (`--keep PATTERN`).
    - `bits_for`: ordered mapping PATTERN -> bits (2, 4, 8, or 16 = keep),
      first match wins (`--bits-for PATTERN=BITS`).
      Patterns are shell-style (fnmatch, matched against the full tensor
      name) unless written `re:REGEX` (re.search).
    - `fallback_thresholds`: minimum cosine per bit width; a layer below it
      is redone at the next width (or is an error under `fail_fast`).
      0.0 disables the check at that width.
    - `quantize_1d`: quantize 1-D tensors (biases, norms) too.
    """

    bit_width: int = DEFAULT_SPEC.bits
    modality: Optional[str] = None
    num_time_groups: int = 10
    group_size: int = DEFAULT_SPEC.group_size
    enable_time_aware: bool = True
    enable_spatial: bool = True
    min_accuracy: float = 0.85
    deployment_profile: str = "local"
    fail_fast: bool = False
    num_threads: int = 0
    max_memory_limit_mb: Optional[int] = None
    enable_mixed_precision: bool = False
    skip_sensitive_layers: bool = False
    # Additions of this version.
    scheme: str = DEFAULT_SPEC.scheme
    method: str = DEFAULT_SPEC.method          # the defaults: spec.QuantSpec
    param_dtype: str = DEFAULT_SPEC.param_dtype
    target_bpw: Optional[float] = None
    keep_patterns: List[str] = field(default_factory=list)
    bits_for: Dict[str, int] = field(default_factory=dict)
    fallback_thresholds: Dict[int, float] = field(
        default_factory=lambda: dict(DEFAULT_MIN_COSINE))
    quantize_1d: bool = False

    # ------------------------------------------------------------------ make

    @classmethod
    def from_profile(cls, name: str, **overrides: Any) -> "DiffusionQuantConfig":
        """The named profile (edge, local, cloud, base), then `overrides`."""
        if name not in PROFILES:
            raise ConfigurationError(
                f"unknown profile {name!r}; allowed: {', '.join(PROFILES)}")
        values: Dict[str, Any] = dict(PROFILES[name], deployment_profile=name)
        values.update(overrides)
        values = dict(width_defaults(values["bit_width"], values.get("scheme", DEFAULT_SPEC.scheme),
                                     values.get("param_dtype")), **values)
        return cls.from_dict(values, validate=False)._validated()

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, validate: bool = True,
                  base: Optional["DiffusionQuantConfig"] = None) -> "DiffusionQuantConfig":
        """A config from a mapping (unknown keys are an error), on top of
        `base` (default: the dataclass defaults)."""
        names = cls.field_names()
        ignored = sorted(k for k in values if k in V1_IGNORED)
        if ignored:
            warnings.warn(f"configuration key(s) {', '.join(map(repr, ignored))} are first-version "
                          "settings that nothing reads; ignored", DeprecationWarning, stacklevel=3)
            values = {k: v for k, v in values.items() if k not in V1_IGNORED}
        unknown = sorted(k for k in values if k not in names)
        if unknown:
            raise ConfigurationError(
                f"unknown configuration key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys: {', '.join(names)}")
        cfg = dataclasses.replace(base) if base is not None else cls()
        for k, v in values.items():
            setattr(cfg, k, _normalize(k, v))
        cfg.keep_patterns = list(cfg.keep_patterns)
        cfg.bits_for = dict(cfg.bits_for)
        cfg.fallback_thresholds = dict(cfg.fallback_thresholds)
        return cfg._validated() if validate else cfg

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["keep_patterns"] = list(self.keep_patterns)
        d["bits_for"] = dict(self.bits_for)
        d["fallback_thresholds"] = {int(k): float(v) for k, v in self.fallback_thresholds.items()}
        return d

    def copy(self, **changes: Any) -> "DiffusionQuantConfig":
        return type(self).from_dict(changes, base=self, validate=False)

    # ------------------------------------------------------------------ YAML

    @classmethod
    def from_yaml(cls, source: Union[str, Path], *,
                  base: Optional["DiffusionQuantConfig"] = None,
                  validate: bool = True) -> "DiffusionQuantConfig":
        """Reads a YAML file (a path) holding a mapping of field names."""
        values = _read_yaml(source)
        if base is None and "deployment_profile" in values and \
                values["deployment_profile"] in PROFILES:
            base = cls.from_profile(values["deployment_profile"])
        return cls.from_dict(values, base=base, validate=validate)

    def to_yaml(self, path: Optional[Union[str, Path]] = None) -> str:
        """The config as YAML text; also written to `path` when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    # ------------------------------------------------------------------ env

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, *,
                 base: Optional["DiffusionQuantConfig"] = None) -> "DiffusionQuantConfig":
        """`base` (default: defaults) with the ARROW_QUANT_* variables applied."""
        return (base if base is not None else cls()).apply_env(environ)

    def apply_env(self, environ: Optional[Mapping[str, str]] = None, *,
                  validate: bool = True) -> "DiffusionQuantConfig":
        """A copy of this config with the ARROW_QUANT_* variables of
        `environ` (default os.environ) applied. Unparsable values raise
        ConfigurationError naming the variable and what it accepts."""
        env = os.environ if environ is None else environ
        for var in V1_IGNORED_ENV:
            if (env.get(var) or "").strip():
                warnings.warn(f"{var} is a first-version setting that nothing reads; ignored",
                              DeprecationWarning, stacklevel=2)
        values: Dict[str, Any] = {}
        for var, name in ENV_FIELDS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[name] = _parse_env(var, name, raw.strip())
        return type(self).from_dict(values, base=self, validate=validate)

    # ------------------------------------------------------------------ check

    def validate(self) -> None:
        """Raises ConfigurationError naming the field, its value and what is allowed."""
        _choice("bit_width", self.bit_width, VALID_BITS)
        if self.modality is not None:
            _choice("modality", self.modality, MODALITIES + (None,))
        _int_range("num_time_groups", self.num_time_groups, 1, 1000)
        _int_range("group_size", self.group_size, 1, 1 << 20)
        _int_range("num_threads", self.num_threads, 0, 4096, "(0 = all cores)")
        if self.max_memory_limit_mb is not None:
            _int_range("max_memory_limit_mb", self.max_memory_limit_mb, 1, 1 << 30,
                       "or None for no limit")
        _float_range("min_accuracy", self.min_accuracy, 0.0, 1.0)
        for name in ("enable_time_aware", "enable_spatial", "fail_fast",
                     "enable_mixed_precision", "skip_sensitive_layers", "quantize_1d"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    f"{name} must be true or false, got {getattr(self, name)!r}")
        _choice("deployment_profile", self.deployment_profile, PROFILE_NAMES)
        _choice("scheme", self.scheme, VALID_SCHEMES)
        _choice("method", self.method, VALID_METHODS)
        _choice("param_dtype", self.param_dtype, VALID_PARAM_DTYPES)
        if self.param_dtype == "superblock" and self.scheme != "asymmetric":
            raise ConfigurationError(
                f"param_dtype 'superblock' needs scheme 'asymmetric' (its zero codes carry the "
                f"offset), got scheme {self.scheme!r}")
        if self.method in ("grid-nl", "grid-learned") and self.scheme != "asymmetric":
            raise ConfigurationError(
                f"method {self.method!r} (a code grid) needs scheme 'asymmetric', got scheme "
                f"{self.scheme!r}")
        if self.target_bpw is not None:
            t = self.target_bpw
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (2.0 < t <= 32.0):
                raise ConfigurationError(
                    f"target_bpw must be a number above 2 (INT2 plus its group parameters) "
                    f"and at most 32, got {t!r}")
        for p in self.keep_patterns:
            check_pattern(p, "keep_patterns")
        for p, b in self.bits_for.items():
            check_pattern(p, "bits_for")
            if isinstance(b, bool) or b not in RULE_BITS:
                raise ConfigurationError(
                    f"bits_for[{p!r}] must be one of 2, 4, 8 or 16 (16 = keep unquantized), "
                    f"got {b!r}")
        for b, c in self.fallback_thresholds.items():
            if b not in VALID_BITS:
                raise ConfigurationError(
                    f"fallback_thresholds keys must be bit widths 2, 4 or 8, got {b!r}")
            _float_range(f"fallback_thresholds[{b}]", c, 0.0, 1.0)

    def _validated(self) -> "DiffusionQuantConfig":
        self.validate()
        return self

    # ------------------------------------------------------------------ use

    @property
    def mixed_precision(self) -> bool:
        """Whether bits are allocated per layer (target_bpw or enable_mixed_precision)."""
        return self.target_bpw is not None or self.enable_mixed_precision

    def spec_for(self, bits: int) -> QuantSpec:
        """The spec of a tensor at `bits` in this run (a rule, the allocator
        or a timestep layer may give it another width than bit_width): the
        run's settings; at another width, that width's defaults
        (spec.default_spec) when the run's settings are its own width's
        defaults, so that e.g. an INT2 layer of a default INT4 run gets the
        INT2 search rather than INT4's rtn."""
        own = QuantSpec(bits, self.group_size, self.scheme, self.method, self.param_dtype)
        if bits == self.bit_width or bits not in VALID_BITS:
            return own
        if own.method == "grid-nl" and bits != 4:  # the fixed table is 4-bit: learn one
            own = own.replace(method="grid-learned")
        mine = width_defaults(self.bit_width, self.scheme)
        if mine and all(getattr(self, k) == v for k, v in mine.items()):
            return default_spec(bits, self.scheme)
        return own

    def min_cosine(self, bits: int) -> Optional[float]:
        c = self.fallback_thresholds.get(bits)
        return None if c is None or c <= 0.0 else float(c)


# ---------------------------------------------------------------------- resolve


def resolve(config_file: Optional[Union[str, Path]] = None, profile: Optional[str] = None,
            overrides: Optional[Mapping[str, Any]] = None,
            environ: Optional[Mapping[str, str]] = None) -> DiffusionQuantConfig:
    """The effective config: profile < file < environment < overrides (see the
    module docstring). `overrides` maps field names to values; None values
    are skipped. `environ` defaults to os.environ."""
    file_values: Dict[str, Any] = _read_yaml(config_file) if config_file is not None else {}
    env = os.environ if environ is None else environ
    explicit_keys = set(file_values) | {name for var, name in ENV_FIELDS.items()
                                   if (env.get(var) or "").strip()} | \
        {k for k, v in (overrides or {}).items() if v is not None}
    base_name = profile if profile is not None else file_values.get("deployment_profile", "local")
    if base_name == "custom":
        cfg = DiffusionQuantConfig(deployment_profile="custom")
    else:
        cfg = DiffusionQuantConfig.from_profile(base_name)
    file_cfg = None
    if file_values:
        values = dict(file_values)
        if profile is not None:
            # An explicit profile names the run's profile even if the file says otherwise.
            values.pop("deployment_profile", None)
        try:
            cfg = file_cfg = DiffusionQuantConfig.from_dict(values, base=cfg, validate=False)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{config_file}: {exc}") from None
    cfg = cfg.apply_env(environ, validate=False)
    if overrides:
        explicit = {k: v for k, v in overrides.items() if v is not None}
        cfg = DiffusionQuantConfig.from_dict(explicit, base=cfg, validate=False)
    if cfg.bit_width in VALID_BITS:
        # What the user did not set follows the final bit width.
        given_pd = cfg.param_dtype if "param_dtype" in explicit_keys else None
        follow = {k: v for k, v in width_defaults(cfg.bit_width, cfg.scheme, given_pd).items()
                  if k not in explicit_keys}
        cfg = DiffusionQuantConfig.from_dict(follow, base=cfg, validate=False)
    try:
        cfg.validate()
    except ConfigurationError as exc:
        _blame_file(exc, file_cfg, config_file)
        raise
    return cfg


def width_defaults(bits: int, scheme: str = DEFAULT_SPEC.scheme,
                   param_dtype: Optional[str] = None) -> Dict[str, Any]:
    """group_size / method / param_dtype of spec.default_spec(bits, scheme, param_dtype)."""
    if bits not in VALID_BITS or (param_dtype is not None and param_dtype not in VALID_PARAM_DTYPES):
        return {}
    spec = default_spec(bits, scheme if scheme in VALID_SCHEMES else DEFAULT_SPEC.scheme, param_dtype)
    return {k: getattr(spec, k) for k in WIDTH_FIELDS}


def _blame_file(exc: ConfigurationError, file_cfg: Optional["DiffusionQuantConfig"],
                config_file: Any) -> None:
    """Raises `exc` prefixed with the config file's name when the file's
    values alone (on their profile) already give that error."""
    if file_cfg is None:
        return
    try:
        file_cfg.validate()
    except ConfigurationError as own:
        if str(own) == str(exc):
            raise ConfigurationError(f"{config_file}: {exc}") from None


# ---------------------------------------------------------------------- helpers


def parse_bits_for(rules: Union[None, str, List[str]]) -> Dict[str, int]:
    """`["PATTERN=BITS", ...]` (the CLI's repeated --bits-for) -> ordered dict.
    BITS is 2, 4, 8, or 16 / fp16 / keep (= keep unquantized). The last '='
    splits, so a regex pattern may contain '='."""
    if rules is None:
        return {}
    if isinstance(rules, str):
        rules = [rules]
    out: Dict[str, int] = {}
    for rule in rules:
        pattern, sep, bits = str(rule).rpartition("=")
        if not sep or not pattern:
            raise ConfigurationError(
                f"--bits-for expects PATTERN=BITS (BITS one of 2, 4, 8, 16), got {rule!r}")
        bits = bits.strip().lower()
        if bits in ("16", "fp16", "float16", "keep", "none"):
            value = KEEP_BITS
        else:
            try:
                value = int(bits)
            except ValueError:
                raise ConfigurationError(
                    f"--bits-for {rule!r}: BITS must be 2, 4, 8 or 16, got {bits!r}") from None
        if value not in RULE_BITS:
            raise ConfigurationError(
                f"--bits-for {rule!r}: BITS must be 2, 4, 8 or 16, got {value}")
        check_pattern(pattern, "--bits-for")
        out[pattern] = value
    return out


def check_pattern(pattern: Any, what: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigurationError(f"{what}: a pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigurationError(f"{what}: bad regular expression {pattern!r}: {exc}") from None


def _read_yaml(source: Union[str, Path]) -> Dict[str, Any]:
    import yaml

    path = Path(source)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {str(path)!r}: {exc}") from None
    text = decode_text(raw, path, "the config file")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigurationError(f"config file {str(path)!r}: YAML nested too deeply") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigurationError(
            f"config file {str(path)!r} must hold a mapping of settings, got "
            f"{type(values).__name__}")
    return values


def _normalize(name: str, value: Any) -> Any:
    """Coerces container fields read from YAML/CLI into their types."""
    if name == "keep_patterns":
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigurationError(f"keep_patterns must be a list of patterns, got {value!r}")
        return list(value)
    if name == "bits_for":
        if value is None:
            return {}
        if isinstance(value, (list, tuple, str)):
            return parse_bits_for(list(value) if not isinstance(value, str) else value)
        if not isinstance(value, Mapping):
            raise ConfigurationError(
                f"bits_for must map PATTERN to bits (or be a list of 'PATTERN=BITS'), got {value!r}")
        return dict(value)
    if name == "fallback_thresholds":
        if not isinstance(value, Mapping):
            raise ConfigurationError(
                f"fallback_thresholds must map bit width to minimum cosine, got {value!r}")
        out = {}
        for k, v in value.items():
            try:
                out[int(k)] = v
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"fallback_thresholds keys must be bit widths 2, 4 or 8, got {k!r}") from None
        return out
    if name == "target_bpw" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _parse_env(var: str, name: str, raw: str) -> Any:
    if name in ("param_dtype", "method"):
        return raw  # validated with the rest of the config
    if name == "fail_fast":
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigurationError(
            f"{var}={raw!r} is not a boolean; use one of {', '.join(_TRUE + _FALSE)}")
    if name == "min_accuracy":
        try:
            return float(raw)
        except ValueError:
            raise ConfigurationError(
                f"{var}={raw!r} is not a number; expected a value in [0, 1] such as 0.85") from None
    if name == "max_memory_limit_mb" and raw.lower() in ("none", "unlimited"):
        return None
    try:
        return int(raw, 10)
    except ValueError:
        raise ConfigurationError(
            f"{var}={raw!r} is not an integer; expected a whole number for {name}") from None


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        ok = False
    else:
        ok = value in allowed
    if not ok:
        shown = ", ".join("None" if a is None else repr(a) if isinstance(a, str) else str(a)
                          for a in allowed)
        raise ConfigurationError(f"{name} must be one of {shown}; got {value!r}")


def _int_range(name: str, value: Any, lo: int, hi: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= hi):
        extra = f" {note}" if note else ""
        raise ConfigurationError(
            f"{name} must be an integer from {lo} to {hi}{extra}; got {value!r}")


def _float_range(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
        raise ConfigurationError(f"{name} must be a number from {lo} to {hi}; got {value!r}")


__all__ = [
    "DiffusionQuantConfig",
    "PROFILES",
    "MODALITIES",
    "ENV_FIELDS",
    "resolve",
    "parse_bits_for",
]
