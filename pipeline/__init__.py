"""The Ray Data pipeline: configuration, input checks, the LoGo dataflow, outputs and their commit.

    from pipeline import load_config, run_job
    report = run_job(load_config("job.yaml", {"routing.k": 5}))
    print(report.format())

This package is the only one that imports `ray.data` (in `pipeline.dataflow`, loaded when a job
has rows to compute).
"""

from pipeline.commit import OutputError
from pipeline.errors import StageError
from pipeline.config import (
    AdaptersConfig, ConfigError, GenerationConfig, InputConfig, JobConfig, ModelConfig, OutputConfig,
    ResourcesConfig, RoutingConfig, StorageConfig,
)
from pipeline.config_io import config_from_dict, config_hash, config_to_dict, load_config
from pipeline.inputs import InputError
from pipeline.outputs import read_output
from pipeline.report import RunReport
from pipeline.runner import run_job
from pipeline.validate import Validation, validate_job

__all__ = [
    "AdaptersConfig", "ConfigError", "GenerationConfig", "InputConfig", "InputError", "JobConfig", "ModelConfig",
    "OutputConfig", "OutputError", "ResourcesConfig", "RoutingConfig", "RunReport", "StageError", "StorageConfig",
    "Validation", "config_from_dict", "config_hash", "config_to_dict", "load_config", "read_output", "run_job",
    "validate_job",
]
