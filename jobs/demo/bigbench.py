"""The BIG-bench suite: real task prompts read from the `bigbench==1.0.0` source distribution.

The sdist (358 MB) is fetched once into `<cache>/bigbench/` (the demo's cache: `$LOGO_CACHE` or
`~/.cache/logo-batch`) with `pip download --no-deps`; nothing else is downloaded and nothing is
installed (the package itself pulls TensorFlow-era dependencies). Recent pip refuses to finish
downloading this sdist (it declares a direct-URL dependency); the archive is then fetched from the
registry's simple index that pip reads (PEP 691), its sha256 checked. Tasks are read straight from the tar archive:
`bigbench/benchmark_tasks/<task>[/<subtask>]/task.json`, a task with subtasks being named
`<task>/<subtask>`.

Prompt of an example: the task prefix, the input, the options of a multiple-choice task (one per
line, in a seeded order per example), then `\\nAnswer:`. The answer is the target (the first one
when there are several; every listed target is accepted) or the best-scored option (every option
with the top score is accepted). Examples whose answer spans lines, is empty or too long, and
prompts longer than `SplitConfig.max_prompt_chars`, are left out; so is every example whose prompt
occurs twice. Splits are disjoint and seeded per task (the same mix of suite seed and task name as
the generated demo suite): the kept examples in a seeded order, the first `n_test` to test, the
next `n_val` to validation, the rest (up to `n_train`) to training.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from jobs.demo.data import SPLITS, task_seed
from jobs.demo.model import CACHE_ENV, cache_root

PACKAGE = "bigbench==1.0.0"
ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
SIMPLE_INDEX = "https://pypi.org/simple/bigbench/"
"""The package's page in the registry's simple index (PEP 691 JSON), read when pip refuses the sdist."""
TASKS_DIR = "bigbench/benchmark_tasks/"
ANSWER_CUE = "\nAnswer:"

BBH_TASKS: tuple[str, ...] = (
    "boolean_expressions", "causal_judgment", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies_syllogisms_negation", "geometric_shapes", "hyperbaton",
    "logical_deduction", "movie_recommendation", "multistep_arithmetic", "navigate",
    "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
    "tracking_shuffled_objects", "web_of_lies", "word_sorting",
)
"""The BIG-bench tasks that BIG-Bench Hard draws from (the paper's benchmark)."""

POOL_TASKS: tuple[str, ...] = (
    # free answers, short prompts first
    "qa_wikidata", "linguistic_mappings/plural_json", "word_unscrambling", "periodic_elements/subtask_1",
    "auto_categorization", "operators", "list_functions/00_shot_baseline",
    "modified_arithmetic/three_digit_addition_control", "matrixshapes",
    "unit_conversion/unit_addition_same", "chess_state_tracking/real_short",
    # multiple choice
    "strategyqa", "elementary_math_qa/mathematical_hint_only", "anachronisms",
    "cs_algorithms/valid_parentheses", "hindu_knowledge", "entailed_polarity", "implicatures",
    "fact_checker/fever", "emojis_emotion_prediction", "color/rgb", "social_support",
    "logical_fallacy_detection", "language_identification",
)
"""The shipped pool's tasks (one adapter each, `jobs/demo/bigbench_adapters`): no BBH source among them."""

HELD_OUT_TASKS: tuple[str, ...] = (
    "navigate", "sports_understanding", "date_understanding", "disambiguation_qa", "hyperbaton",
    "logical_deduction", "snarks", "temporal_sequences", "object_counting", "penguins_in_a_table",
    "ruin_names",
)
"""BBH tasks kept out of the pool: prompts with no adapter of their own (the paper's setting)."""


@dataclass(frozen=True)
class SplitConfig:
    """How many examples each split of a BIG-bench task holds, and which examples are kept."""

    seed: int = 20260
    """Suite seed; each task's order is seeded with `seed` mixed with the task name."""
    n_train: int = 300
    """Training examples per task (fewer when the task has fewer)."""
    n_val: int = 16
    """Validation examples per task (the training report)."""
    n_test: int = 20
    """Held-out test examples per task (the quality benchmark)."""
    max_prompt_chars: int = 600
    """Longer prompts are left out (bounds the cost of training and probing)."""
    max_answer_chars: int = 40
    """Examples whose answer is longer are left out (answers are generated greedily, one line)."""


def archive_path(cache_dir: Path | None = None, fetch: bool = True) -> Path:
    """The local sdist, fetched into `<cache>/bigbench/` on first use (`fetch=False`: only look)."""
    path = (cache_dir or cache_root()) / "bigbench" / ARCHIVE_NAME
    if not path.is_file():
        if not fetch:
            raise FileNotFoundError(f"{path} is missing; run `pip download --no-deps {PACKAGE} -d {path.parent}`")
        fetch_archive(path.parent)
    return path


def _offline_error(dest: Path, detail: str) -> RuntimeError:
    return RuntimeError(
        f"could not fetch {PACKAGE} (the BIG-bench task archive, 358 MB) into {dest}: {detail.strip()[-600:]}\n"
        f"The BIG-bench suite needs it once. On a machine with access to PyPI run "
        f"`pip download --no-deps {PACKAGE} -d {dest}` (or copy {ARCHIVE_NAME} there); "
        f"${CACHE_ENV} chooses the cache directory.")


def fetch_archive(dest: Path) -> Path:
    """Download the sdist into `dest` with pip (the simple index when pip refuses it); atomic rename."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / ARCHIVE_NAME
    with tempfile.TemporaryDirectory(prefix=".bigbench-", dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / ARCHIVE_NAME
        if not got.is_file():
            if "direct URL" not in proc.stderr:  # offline, no such index, ...
                raise _offline_error(dest, proc.stderr or proc.stdout)
            _download_from_index(got, dest)
        got.rename(target)
    return target


def _download_from_index(out: Path, dest: Path) -> None:
    try:
        request = urllib.request.Request(SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            files = json.load(resp)["files"]
        (entry,) = [f for f in files if f["filename"] == ARCHIVE_NAME]
        digest = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=60) as resp, out.open("wb") as fh:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
    except (OSError, ValueError, KeyError) as exc:
        raise _offline_error(dest, repr(exc)) from exc
    if digest.hexdigest() != entry["hashes"]["sha256"]:
        raise _offline_error(dest, f"sha256 mismatch for {entry['url']}")


def _task_name(member: str) -> str | None:
    """`<task>[/<subtask>]` of a `.../benchmark_tasks/<task>[/<subtask>]/task.json` member."""
    if not member.endswith("/task.json") or TASKS_DIR not in member:
        return None
    return member.split(TASKS_DIR, 1)[1].removesuffix("/task.json")


def read_tasks(names: Iterable[str] | None = None, archive: Path | None = None) -> dict[str, list[dict]]:
    """{name: [task.json, ...]} for each named task (every one when None), in one pass over the archive.

    A name is a folder of `benchmark_tasks`: `<task>` or `<task>/<subtask>`. A task with subtasks
    is the list of its subtasks' task.json (the parent's own file holds no examples); a task
    without is a list of one. With `names=None`, every `<task>[/<subtask>]` with examples is its
    own entry.
    """
    archive = archive or archive_path()
    wanted = None if names is None else list(dict.fromkeys(names))
    found: dict[str, list[dict]] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            path = _task_name(member.name)
            if path is None:
                continue
            owner = path if wanted is None else next(
                (w for w in wanted if path == w or path.startswith(w + "/")), None)
            if owner is None:
                continue
            task = json.load(tar.extractfile(member))
            if isinstance(task.get("examples"), list) and task["examples"]:
                found.setdefault(owner, []).append((path, task))
    if wanted is not None:
        missing = [w for w in wanted if w not in found]
        if missing:
            raise KeyError(f"no BIG-bench JSON task {missing} with examples in {archive}; a name is a folder of "
                           "bigbench/benchmark_tasks (`<task>` or `<task>/<subtask>`), see `list_tasks()`")
    order = wanted if wanted is not None else sorted(found)
    return {n: [t for _, t in sorted(found[n], key=lambda pt: pt[0])] for n in order}


def list_tasks(archive: Path | None = None) -> list[str]:
    """Every JSON task with examples in the archive, `<task>` or `<task>/<subtask>`."""
    return list(read_tasks(None, archive))


def options(example: dict) -> list[str]:
    """The options of a multiple-choice example (target_scores' keys, in file order); [] otherwise."""
    return list(example.get("target_scores") or {})


def answers(example: dict) -> list[str]:
    """The accepted answers: the best-scored options, or the target(s); the first is the answer."""
    scores = example.get("target_scores")
    if scores:
        best = max(scores.values())
        return [o for o, s in scores.items() if s == best]
    target = example.get("target")
    targets = [target] if isinstance(target, str) else list(target or [])
    return [t.strip() for t in targets if isinstance(t, str)]


def build_prompt(prefix: str, example: dict, rng: random.Random) -> str:
    """Prefix, input, options (shuffled by `rng`, one `- option` line each), then the answer cue."""
    parts = [prefix.strip()] if prefix and prefix.strip() else []
    parts.append(example["input"].strip())
    opts = options(example)
    if opts:
        rng.shuffle(opts)
        parts.append("Options:\n" + "\n".join(f"- {o.strip()}" for o in opts))
    return "\n".join(parts) + ANSWER_CUE


def _keep(answer: str, cfg: SplitConfig) -> bool:
    return bool(answer) and "\n" not in answer and len(answer) <= cfg.max_answer_chars


def task_rows(name: str, parts: list[dict], cfg: SplitConfig = SplitConfig()) -> list[dict[str, str]]:
    """Every kept example of one task (its task.json files, `read_tasks`) as rows, in seeded order.

    A row: `task`, `prompt`, `answer` (the first accepted answer) and `payload` (JSON: every
    accepted `answers`, whether the example is `multiple_choice`).
    """
    seed = task_seed(name, cfg.seed)
    rows, counts = [], {}
    for p, task in enumerate(parts):
        prefix = task.get("task_prefix", "") or ""
        for i, example in enumerate(task["examples"]):
            if not isinstance(example, dict) or not isinstance(example.get("input"), str):
                continue
            accepted = [a.strip() for a in answers(example)]
            if not accepted or not _keep(accepted[0], cfg):
                continue
            prompt = build_prompt(prefix, example, random.Random(seed + 1_000_003 * p + i))
            if len(prompt) > cfg.max_prompt_chars:
                continue
            counts[prompt] = counts.get(prompt, 0) + 1
            rows.append({"task": name, "prompt": prompt, "answer": accepted[0],
                         "payload": json.dumps({"answers": accepted, "multiple_choice": bool(options(example))})})
    rows = [r for r in rows if counts[r["prompt"]] == 1]  # a repeated prompt may carry two answers
    random.Random(seed).shuffle(rows)
    return rows


def split_rows(rows: list[dict[str, str]], split: str, cfg: SplitConfig = SplitConfig()) -> list[dict[str, str]]:
    """One split of a task's rows (from `task_rows`): test first, then validation, then training."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    bounds = {"test": (0, cfg.n_test), "validation": (cfg.n_test, cfg.n_test + cfg.n_val),
              "train": (cfg.n_test + cfg.n_val, cfg.n_test + cfg.n_val + cfg.n_train)}
    lo, hi = bounds[split]
    return rows[lo:hi]


def task_splits(names: Iterable[str], cfg: SplitConfig = SplitConfig(),
                archive: Path | None = None) -> dict[str, dict[str, list[dict[str, str]]]]:
    """{task: {split: rows}} for the named tasks, read in one pass over the archive."""
    out = {}
    for name, parts in read_tasks(names, archive).items():
        rows = task_rows(name, parts, cfg)
        out[name] = {s: split_rows(rows, s, cfg) for s in SPLITS}
    return out


def normalise(text: str) -> str:
    """Case and inner spacing folded, trailing period dropped: how outputs and answers are compared."""
    return re.sub(r"\s+", " ", text.strip()).rstrip(".").strip().lower()


def check_row(row: dict[str, str], answer: str) -> bool:
    """Exact match of `answer` (a model's first line) against any accepted answer of the row."""
    got = normalise(answer)
    return bool(got) and any(got == normalise(a) for a in json.loads(row["payload"])["answers"])


def adapter_name(task: str) -> str:
    """The adapter directory of a task: `/` (a subtask) becomes `__`."""
    return task.replace("/", "__")
