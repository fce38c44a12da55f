"""Job files: the schema (schema.py: one dataclass per TOML section) and loading, overrides and
validation (load.py). Everything is importable from here: `from hvdllm.config import load_job`."""

from hvdllm.config.load import (
    LIMITS,
    MAX_STEPS,
    dump_toml,
    job_from_toml,
    load_job,
    parse_override,
    validate,
)
from hvdllm.config.schema import (
    SECTIONS,
    ConfigError,
    DataConfig,
    JobConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    SlurmConfig,
    TrainingConfig,
)

__all__ = ["LIMITS", "MAX_STEPS", "SECTIONS", "ConfigError", "DataConfig", "JobConfig",
           "ModelConfig", "OptimConfig", "ParallelConfig", "PrecisionConfig", "RunConfig",
           "SlurmConfig", "TrainingConfig", "dump_toml", "job_from_toml", "load_job",
           "parse_override", "validate"]
