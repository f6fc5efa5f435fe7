"""Job configuration: frozen dataclasses, one per section, each field documented.

A job is described by one `JobConfig`. It is built from a mapping (a YAML file, usually) by
`pipeline.config_io.load_config`, which refuses unknown keys and badly typed values naming the
key; the value checks below (`__post_init__`) name the key too. Credentials never appear here:
they come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or
the node's role).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

from actors import options
from actors.residency import parse_max_resident

OUTPUT_COLUMNS = ("id", *options.OUTPUT_COLUMNS)
"""Columns every output row carries, in this order (see pipeline/README.md, "Output"): the row's id, then the
predictor's columns (`actors.options.OUTPUT_COLUMNS`)."""
INTERNAL_PREFIX = "_logo_"
"""Columns the dataflow adds for itself start with this; no input column may."""


class ConfigError(ValueError):
    """A configuration key is unknown, missing or has a bad value; the message names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _check(value in allowed, key, f"must be one of {', '.join(allowed)}; got {value!r}")


def _option_checks(check: Callable[[], None], section: str) -> None:
    """Run an `actors.options` class's own checks, naming the section in what they refuse."""
    try:
        check()
    except ConfigError:
        raise
    except ValueError as err:  # "key: what is wrong; got value"
        raise ConfigError(f"{section}.{err}") from None


@dataclass(frozen=True)
class ModelConfig:
    section: ClassVar[str] = "model"

    path: str
    """Base model: a local Hugging Face model directory (config, safetensors, tokenizer) or an
    `s3://` prefix holding one (downloaded once per node into `storage.cache_dir`)."""
    dtype: str = "auto"
    """Weight dtype: auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """Device inside each actor: auto (cuda when the actor has a GPU, else cpu), cpu or cuda."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "model.path", "is empty; give a model directory or s3:// prefix")
        _one_of(self.dtype, ("auto", "float32", "bfloat16", "float16"), "model.dtype")
        _one_of(self.device, ("auto", "cpu", "cuda"), "model.device")


@dataclass(frozen=True)
class AdaptersConfig:
    section: ClassVar[str] = "adapters"

    path: str
    """Adapter pool: a local directory or `s3://` prefix with one sub-directory per adapter, each in
    PEFT format (adapter_config.json + adapter_model.safetensors); the sub-directory name is the
    adapter name reported in the output."""

    max_resident: int | str | None = "auto"
    """Most adapters whose full factors an actor keeps on its device (an int), or most bytes of
    them (e.g. '20GiB'), or `auto` (the default): what the device has free once the model and the
    routing index are loaded, less `resources.memory_headroom` of it and the KV cache of a full
    batch (`resources.batch_size` rows of `generation.max_prompt_tokens` plus `max_new_tokens`),
    logged by each actor with its arithmetic (on the CPU: the whole pool); the others are read on demand
    from the node's copy of the pool, least recently used first out. Null: the whole pool. Routing
    reads the routing index either way. A size that holds fewer than k adapter slots (in the
    actors' dtype) is refused before any work, by run and validate alike (`pipeline.bounds`).
    Never changes an output, so not part of the job's hash."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "adapters.path", "is empty; give an adapter directory or s3:// prefix")
        try:
            parse_max_resident(self.max_resident)
        except ValueError as err:
            raise ConfigError(f"adapters.{err}") from None


# The paper's routing (LOGO_SPEC section 1), as `routing` keys: `logo-batch run --paper`.
PAPER_ROUTING = {**options.PAPER_ROUTING, "calibration": None}
CALIBRATION_SOURCES = ("input", "reference")


@dataclass(frozen=True)
class RoutingConfig(options.RoutingConfig):
    """`routing:`: the routing options of `actors.options.RoutingConfig` (k, signal, probe_layers,
    probe_module, probe_input, calibration_score: documented there, the same defaults), and where
    the job's calibration statistics come from."""

    section: ClassVar[str] = "routing"

    calibration: str | None = "input"
    """Per-adapter, per-pair score statistics for `calibration_score`: `input` (computed from a seeded
    sample of this job's prompts; the reference set when the input has fewer than
    `calibration_min_rows` usable prompts, recorded in the manifest), `reference` (the shipped
    reference set: BIG-bench prompts of tasks outside both shipped pools), a statistics file from
    `logo-batch calibrate` (local path or s3:// URI), or null (only with calibration_score raw).
    Ignored (null) with raw scores."""
    calibration_sample: int = 256
    """Prompts sampled from the input when `calibration` is `input`."""
    calibration_min_rows: int = 32
    """Fewest usable input prompts for `input` statistics; below it the reference set is used."""
    calibration_seed: int = 0
    """Seed of that sample."""

    def __post_init__(self) -> None:
        _option_checks(super().__post_init__, self.section)
        if self.calibration_score == "raw":
            object.__setattr__(self, "calibration", None)  # raw scores read no statistics
        _check(self.calibration_score == "raw" or self.calibration is not None, "routing.calibration_score",
               f"{self.calibration_score!r} needs routing.calibration (input, reference or a statistics file); "
               "for the paper's uncalibrated routing set calibration_score: raw (or run with --paper)")
        _check(self.calibration != "", "routing.calibration", "is empty; give input, reference, a file or null")
        _check(self.calibration_sample >= 1, "routing.calibration_sample",
               f"must be >= 1; got {self.calibration_sample}")
        _check(self.calibration_min_rows >= 1, "routing.calibration_min_rows",
               f"must be >= 1; got {self.calibration_min_rows}")

    def actor_options(self) -> options.RoutingConfig:
        """The predictor's routing options (the job-only keys left out)."""
        return options.RoutingConfig(**{key: getattr(self, key) for key in options.field_names(options.RoutingConfig)})


@dataclass(frozen=True)
class GenerationConfig(options.GenerationConfig):
    """`generation:`: the generation options of `actors.options.GenerationConfig` (max_new_tokens,
    stop_at_newline, stop_strings, overlong, max_prompt_tokens, probe_bucket_overhead,
    generate_step_slots, ordering: documented there, the same defaults). An actor's generate calls
    hold `resources.batch_size` rows. The grouping keys of earlier versions (`actors.options.RETIRED`)
    are read and ignored."""

    section: ClassVar[str] = "generation"

    def __post_init__(self) -> None:
        _option_checks(super().__post_init__, self.section)

    def actor_options(self) -> options.GenerationConfig:
        """The predictor's generation options."""
        return options.GenerationConfig(**{key: getattr(self, key)
                                           for key in options.field_names(options.GenerationConfig)})


@dataclass(frozen=True)
class InputConfig:
    section: ClassVar[str] = "input"

    uri: str
    """Prompts: a Parquet file, a local directory or an s3:// prefix of Parquet files (searched
    recursively; names starting with '_' or '.' are skipped)."""
    prompt_column: str = "prompt"
    """Column holding the prompt text."""
    id_column: str | None = None
    """Column holding a unique row id (converted to string). Default: ids derived from the file
    and row position, `<file relative to uri>:<row>`."""
    passthrough: tuple[str, ...] = ()
    """Input columns copied unchanged into the output (the prompt column may be one of them)."""

    def __post_init__(self) -> None:
        _check(bool(self.uri), "input.uri", "is empty; give a Parquet file, directory or s3:// prefix")
        _check(bool(self.prompt_column), "input.prompt_column", "is empty")
        _check(self.id_column is None or bool(self.id_column), "input.id_column",
               "is empty; name the id column, or leave the key out to derive ids from file and row")
        _check(self.prompt_column not in OUTPUT_COLUMNS, "input.prompt_column",
               f"{self.prompt_column!r} clashes with the output column of that name (every output row has its "
               "own id and output); rename the input column")
        _check(self.id_column is None or self.id_column != self.prompt_column, "input.id_column",
               f"{self.id_column!r} is also input.prompt_column; ids and prompts must be different columns")
        for key, name in [("input.prompt_column", self.prompt_column), ("input.id_column", self.id_column or ""),
                          *(("input.passthrough", n) for n in self.passthrough)]:
            _check(not name.startswith(INTERNAL_PREFIX), key,
                   f"{name!r}: names starting with {INTERNAL_PREFIX!r} are kept for the dataflow's own columns; "
                   "rename the input column")
        for name in self.passthrough:
            _check(bool(name), "input.passthrough", "holds an empty column name")
            _check(name not in OUTPUT_COLUMNS, "input.passthrough",
                   f"{name!r} clashes with the output column of that name; drop it or rename the input column")
        _check(len(set(self.passthrough)) == len(self.passthrough), "input.passthrough",
               f"lists a column twice: {list(self.passthrough)}")


@dataclass(frozen=True)
class OutputConfig:
    section: ClassVar[str] = "output"

    uri: str
    """Run prefix (local directory or s3:// prefix): data files go under `data/`, then
    `_manifest.json`, then `_SUCCESS` when the run is complete."""
    overwrite: bool = False
    """Delete an earlier run's files at `uri` first instead of resuming it."""

    def __post_init__(self) -> None:
        _check(bool(self.uri), "output.uri", "is empty; give a directory or s3:// prefix")


@dataclass(frozen=True)
class ResourcesConfig:
    section: ClassVar[str] = "resources"

    actors: int = 1
    """Number of LoGo actors (each holds one model and the adapter pool)."""
    batch_size: int = 16
    """Rows per generate call of an actor (it routes a whole block, then generates it in batches
    of this many rows formed by `generation.ordering`)."""
    gpus_per_actor: float | None = None
    """GPUs reserved per actor. Default: 1 when the Ray cluster has GPUs, else 0. A whole number
    N > 1 spreads the model over the actor's N GPUs (a transformers device map), each adapted
    module's adapter slots on its module's GPU; a fraction below 1 shares a GPU between actors."""
    cpus_per_actor: float | None = None
    """CPUs reserved per actor. Default: 1 with GPUs; without GPUs an equal share of the cluster's
    CPUs less one kept for reading and writing (fractional below 1; two 1-CPU actors on a
    2-CPU machine would leave the read tasks no CPU)."""
    rows_per_block: int | None = None
    """Rows per read block (and roughly per output file). Default: about four blocks per actor,
    at least `batch_size` rows and at most 4096."""
    ray_address: str | None = None
    """Ray cluster to join (e.g. auto or ray://host:10001); default: RAY_ADDRESS, else a local Ray."""
    memory_headroom: float = 0.1
    """With `adapters.max_resident: auto`, the share of each actor's device memory left free for
    activations and the allocator (the adapter slots take what the model, the routing index and the
    KV cache of a full batch leave, less this)."""

    def __post_init__(self) -> None:
        _check(self.actors >= 1, "resources.actors", f"must be >= 1; got {self.actors}")
        _check(0 <= self.memory_headroom < 1, "resources.memory_headroom",
               f"must be >= 0 and < 1 (a share of device memory); got {self.memory_headroom}")
        _check(self.batch_size >= 1, "resources.batch_size", f"must be >= 1; got {self.batch_size}")
        if self.gpus_per_actor is not None:
            _check(self.gpus_per_actor >= 0, "resources.gpus_per_actor", f"must be >= 0; got {self.gpus_per_actor}")
            _check(self.gpus_per_actor <= 1 or float(self.gpus_per_actor).is_integer(), "resources.gpus_per_actor",
                   f"above 1 must be a whole number of GPUs (the model is spread over them); got {self.gpus_per_actor}")
        if self.cpus_per_actor is not None:
            cpus = self.cpus_per_actor
            _check(cpus > 0, "resources.cpus_per_actor", f"must be > 0; got {cpus}")
            _check(cpus <= 1 or float(cpus).is_integer(), "resources.cpus_per_actor",
                   f"above 1 must be a whole number (a Ray rule); got {cpus}")
        if self.rows_per_block is not None:
            _check(self.rows_per_block >= 1, "resources.rows_per_block", f"must be >= 1; got {self.rows_per_block}")


@dataclass(frozen=True)
class StorageConfig:
    section: ClassVar[str] = "storage"

    endpoint: str | None = None
    """S3 endpoint URL (e.g. http://127.0.0.1:8333 for SeaweedFS or MinIO); default: the
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL environment variable, else AWS itself."""
    region: str | None = None
    """S3 region; default: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1."""
    cache_dir: str | None = None
    """Local directory where s3:// models and adapters are cached on each node; default:
    LOGO_BATCH_CACHE, else ~/.cache/logo-batch."""
    retries: int = 10
    """Attempts per object-storage request before it fails: connection errors, timeouts, throttling
    and 5xx replies are retried with exponential backoff and jitter (about a minute in all with
    10), so a short outage of the storage service is ridden out."""

    def __post_init__(self) -> None:
        _check(self.retries >= 1, "storage.retries", f"must be >= 1; got {self.retries}")
        if self.endpoint is not None:
            _check(self.endpoint.startswith(("http://", "https://")), "storage.endpoint",
                   f"must start with http:// or https://; got {self.endpoint!r}")


@dataclass(frozen=True)
class RunConfig:
    section: ClassVar[str] = "run"

    max_error_fraction: float = 0.01
    """Most rows, as a fraction of the input, that may end with an error (of any kind, bad input
    included) for the run to commit. Above it the run stops before committing, naming the most
    common error, and keeps every row written: rerun with `--retry-errors` once the cause is
    fixed, or raise this value to accept the errors. Not part of the job's hash: it may change
    between attempts."""
    lease_timeout_s: float = 120.0
    """A driver renews its lease on the output every fifth of this; a lease not renewed for this
    long belongs to a dead driver and may be taken over by a new one."""

    def __post_init__(self) -> None:
        _check(self.lease_timeout_s > 0, "run.lease_timeout_s", f"must be > 0; got {self.lease_timeout_s}")
        _check(0 <= self.max_error_fraction <= 1, "run.max_error_fraction",
               f"must be between 0 and 1; got {self.max_error_fraction}")


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig
    """The base model."""
    adapters: AdaptersConfig
    """The LoRA adapter pool."""
    input: InputConfig
    """Where the prompts are and how to read them."""
    output: OutputConfig
    """Where the results go."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """LoGo routing options."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Generation options."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Actors, batch size and per-actor resources."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint, region and local cache."""
    run: RunConfig = field(default_factory=RunConfig)
    """When a finished run may commit."""

    def __post_init__(self) -> None:
        bound = parse_max_resident(self.adapters.max_resident).adapters
        most = self.routing.max_k
        what = (f"routing.k={self.routing.k}" if most == self.routing.k
                else f"routing.uncertain_k={self.routing.uncertain_k}")
        _check(bound is None or bound >= most, "adapters.max_resident",
               f"{bound} adapters cannot hold one prompt's {what} selected adapters at once; "
               f"set it to at least {most} (or null for the whole pool)")

    def predictor_options(self) -> dict:
        """Keyword arguments for `actors.LoGoPredictor`, less `model`, `adapters` and the calibration
        statistics (see `stages.predictor_from_config`)."""
        return dict(routing=self.routing.actor_options(), generation=self.generation.actor_options(),
                    max_resident=self.adapters.max_resident, memory_headroom=self.resources.memory_headroom,
                    gpus=int(self.resources.gpus_per_actor) if (self.resources.gpus_per_actor or 0) > 1 else 1,
                    batch_size=self.resources.batch_size,
                    dtype=self.model.dtype, device=self.model.device, prompt_column=self.input.prompt_column)


SECTIONS = (ModelConfig, AdaptersConfig, RoutingConfig, GenerationConfig, InputConfig, OutputConfig,
            ResourcesConfig, StorageConfig, RunConfig)
