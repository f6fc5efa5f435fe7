"""What the throughput benchmark measures: model shapes, workload regimes, and run presets."""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTENTION + ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A Llama-style base model and the LoRA adapters of its pool."""

    name: str
    """Label used in the table, the JSON and the plot."""
    hidden: int
    """hidden_size of the base model."""
    intermediate: int
    """intermediate_size of the MLP."""
    layers: int
    """Number of decoder blocks."""
    heads: int
    """Attention heads (head_dim = hidden / heads)."""
    kv_heads: int
    """Key/value heads (grouped-query attention)."""
    vocab: int
    """Vocabulary size (the LM head's width)."""
    rank: int = 16
    """LoRA rank r of every adapter in the pool."""
    targets: tuple[str, ...] = ATTENTION
    """Module names every adapter adapts, in every block."""
    pretrained: str = ""
    """Name of a pretrained model to use when its converted copy is available ("smollm2"), else ""."""

    def lora_work_ratio(self) -> float:
        """Multiply-adds of one adapter per token over the base model's (blocks plus LM head)."""
        head_dim = self.hidden // self.heads
        shapes = {  # module -> (d_in, d_out)
            "q_proj": (self.hidden, self.hidden), "k_proj": (self.hidden, self.kv_heads * head_dim),
            "v_proj": (self.hidden, self.kv_heads * head_dim), "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        base = self.layers * sum(i * o for i, o in shapes.values()) + self.hidden * self.vocab
        lora = self.layers * sum(self.rank * (shapes[m][0] + shapes[m][1]) for m in self.targets)
        return lora / base


# Llama-3.1-8B with rank-16 adapters on every linear module: the ratio the "8B-ratio" shape imitates.
LLAMA_8B = Shape("llama-3.1-8b", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
                 targets=ALL_LINEAR)
# LoRA work per adapter relative to the base grows as 1/hidden, so at hidden 1024 adapting the four
# attention projections (rank 16) gives 0.73% of the base work per adapter, close to the 8B model's
# 0.56% with all seven modules adapted. Two blocks and a 2048-token vocabulary keep the LM head at
# the 8B model's share (7%) of the work and a run within minutes on two CPU cores.
RATIO_8B = Shape("8b-ratio", hidden=1024, intermediate=3584, layers=2, heads=16, kv_heads=4, vocab=2048)
SMOLLM2 = Shape("smollm2-135m", hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152,
                targets=("q_proj", "v_proj"), pretrained="smollm2")
# Llama-3.1-8B's widths and adapters on four of its blocks (the per-block costs of the real model;
# random weights): the shape a lent GPU measures.
WIDTH_8B = Shape("8b-width", hidden=4096, intermediate=14336, layers=4, heads=32, kv_heads=8, vocab=128256,
                 targets=ALL_LINEAR)
TINY = Shape("tiny", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=96, rank=4)
SHAPES = {s.name: s for s in (RATIO_8B, SMOLLM2, WIDTH_8B, TINY)}


@dataclass(frozen=True)
class Regime:
    """A workload: prompt lengths and generation budget."""

    name: str
    """Label: "generation" (short prompts, long outputs) or "labelling" (long prompts, short outputs)."""
    prompt_min: int
    """Shortest prompt, in tokens (lengths are drawn uniformly between min and max)."""
    prompt_max: int
    """Longest prompt, in tokens."""
    new_tokens: int
    """Tokens generated for every prompt (greedy, no early stop, so every method does the same work)."""


GENERATION = Regime("generation", 16, 48, 128)
LABELLING = Regime("labelling", 100, 300, 8)


@dataclass(frozen=True)
class ShapeRun:
    """One shape, its pool size and the regimes measured on it."""

    shape: Shape
    """The base model and adapter shape."""
    regimes: tuple[Regime, ...]
    """Workloads measured side by side."""
    pool: int = 64
    """Adapters in the pool (PEFT's adapter loading grows quadratically with it: keep deep models small)."""
    prompts: int = 0
    """Prompts per regime for this shape (0: the run's `prompts`)."""
    lean: bool = False
    """Our engine only at k = 1 and the largest k."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run."""

    shapes: tuple[ShapeRun, ...]
    """Each shape with its pool and regimes."""
    prompts: int = 8
    """Prompts per regime (the same prompts for every method)."""
    batch_size: int = 8
    """Rows per batch for every batched method."""
    ks: tuple[int, ...] = (1, 4, 20)
    """Values of k for our engine."""
    released_k: int = 20
    """k of the released code's procedure (batch size 1, rescaled PEFT adapters)."""
    released_prompts: int = 2
    """Prompts run through the released code's procedure per round (it is slow; rates are per prompt),
    picked evenly over the prompts sorted by length."""
    arrow_top_k: int = 3
    """top_k of PEFT Arrow (its cost does not depend on it: every expert is evaluated per token)."""
    repeats: int = 3
    """Timed rounds after one warm-up round; every method runs once per round, and the median counts."""
    sweep_pools: tuple[int, ...] = (8, 64, 256)
    """Pool sizes of the N sweep (empty: no sweep)."""
    sweep_shape: str = "8b-ratio"
    """Shape of the N sweep (labelling regime)."""
    sweep_repeats: int = 2
    """Timed rounds of the sweep."""
    cluster_rows: int = 4
    """Rows per cluster in the given-selections experiment (rows of a cluster share one selection)."""
    threads: int = 1
    """torch CPU threads (1 is steadier on a shared machine)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: str = "auto"
    """auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16."""
    seed: int = 0
    """Seed for weights, adapters and prompts."""


def preset(name: str) -> BenchConfig:
    """`quick` (the default, minutes on two CPU cores), `full` (more prompts and shapes), `gpu` (a CUDA
    device in bfloat16: the 8b-ratio and 8b-width shapes at 64 rows a batch, no sweep), `smoke` (tests)."""
    if name == "quick":
        return BenchConfig(shapes=(ShapeRun(RATIO_8B, (GENERATION, LABELLING)), ShapeRun(SMOLLM2, (LABELLING,), 24, prompts=4, lean=True)))
    if name == "full":
        return BenchConfig(shapes=(ShapeRun(RATIO_8B, (GENERATION, LABELLING)),
                                   ShapeRun(SMOLLM2, (GENERATION, LABELLING))),
                           prompts=32, batch_size=16, released_prompts=4, repeats=5, sweep_repeats=3)
    if name == "gpu":
        return BenchConfig(shapes=(ShapeRun(RATIO_8B, (GENERATION, LABELLING)),
                                   ShapeRun(WIDTH_8B, (GENERATION, LABELLING), 32, lean=True)),
                           prompts=128, batch_size=64, released_prompts=2, repeats=3, sweep_pools=(),
                           device="cuda", dtype="bfloat16")
    if name == "smoke":
        tiny_regimes = (Regime("generation", 3, 8, 6), Regime("labelling", 10, 20, 2))
        return BenchConfig(shapes=(ShapeRun(TINY, tiny_regimes, 8),), prompts=4, batch_size=4, ks=(1, 4),
                           released_k=4, repeats=1, sweep_pools=(4, 8), sweep_shape="tiny", cluster_rows=2,
                           sweep_repeats=1)
    raise ValueError(f"preset {name!r} is not known; use quick, full, gpu or smoke")
