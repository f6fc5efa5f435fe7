"""How much device memory adapter slots may have: with `max_resident: auto`, each device's free
memory less a headroom share of its total and the KV cache of a full batch (actors/README.md,
"Pools larger than an actor"). Measured once, when the pool is built on the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from actors.residency import format_bytes

MEMORY_HEADROOM = 0.10
"""With max_resident auto: the share of each device's memory left free (activations, allocator
slack); the KV cache of a full batch is reserved on top of it (`kv_cache_nbytes`)."""


def kv_cache_nbytes(config, rows: int, tokens: int, itemsize: int) -> int:
    """Bytes of the KV cache of `rows` sequences of `tokens` tokens, per decoder block: keys and
    values of every key-value head (`num_key_value_heads` x `head_dim`, as transformers' caches
    keep them), in the model's dtype."""
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    return 2 * kv_heads * head_dim * itemsize * rows * tokens


@dataclass(frozen=True)
class DeviceBudget:
    """What one device can give adapter slots: `free - headroom x total - reserved` (the KV cache of
    a full batch for the decoder blocks it holds), measured once the model and the routing index are
    loaded."""

    device: torch.device
    free: int
    total: int
    headroom: float
    reserved: int

    @property
    def nbytes(self) -> int:
        return max(0, int(self.free - self.headroom * self.total - self.reserved))

    def describe(self) -> str:
        return (f"{self.device}: {format_bytes(self.free)} free of {format_bytes(self.total)} - headroom "
                f"{self.headroom:.0%} ({format_bytes(int(self.headroom * self.total))}) - KV cache "
                f"{format_bytes(self.reserved)} = {format_bytes(self.nbytes)} for slots")


def device_budget(device: torch.device, headroom: float, reserved: int = 0) -> DeviceBudget | None:
    """What `device` can give adapter slots now (CUDA), or None where memory is not the device's own
    to budget (the CPU: the whole pool)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return DeviceBudget(device, int(free), int(total), headroom, int(reserved))


def slots_within(budgets: Mapping[torch.device, DeviceBudget], slot_bytes: Mapping[torch.device, int]) -> int:
    """Most slots every device holds its share of: min over devices of budget // its bytes per slot
    (the modules a device holds set its share of each slot)."""
    return min(budgets[d].nbytes // n for d, n in slot_bytes.items() if n)
