"""The demo: SmolLM2-135M-Instruct, twelve generated tasks, one shipped LoRA adapter per task."""

from pathlib import Path

ADAPTER_DIR = Path(__file__).resolve().parent / "adapters"
"""The shipped adapter pool (one PEFT adapter per demo task)."""

BIGBENCH_ADAPTER_DIR = Path(__file__).resolve().parent / "bigbench_adapters"
"""The shipped BIG-bench pool (one PEFT adapter per task of `jobs.demo.bigbench.POOL_TASKS`)."""
