"""Settings: one frozen dataclass per stage, validated where it is built, read from YAML recipes and flags."""

from .settings import (
    DEFAULT_CALIB_DATA,
    DEFAULT_PEFT_TRAIN_DATA,
    DEFAULT_PPL_DATA,
    DEFAULT_TRAIN_DATA,
    GRID_BITS,
    GROUP_LAYOUTS,
    NOISE_KINDS,
    SALIENT_DTYPES,
    SPEC_FIELDS,
    SUPPORTED_BITS,
    EvalConfig,
    NoiseSpec,
    QuantizeConfig,
    QuantSpec,
    RecoverConfig,
    build,
    read_recipe,
)

__all__ = ["DEFAULT_CALIB_DATA", "DEFAULT_PEFT_TRAIN_DATA", "DEFAULT_PPL_DATA", "DEFAULT_TRAIN_DATA", "GRID_BITS",
           "GROUP_LAYOUTS", "NOISE_KINDS", "SALIENT_DTYPES", "SPEC_FIELDS", "SUPPORTED_BITS", "EvalConfig", "NoiseSpec",
           "QuantSpec", "QuantizeConfig", "RecoverConfig", "build", "read_recipe"]
