"""`logo-batch calibrate`: per-adapter routing-score statistics from unlabeled prompts.

    logo-batch calibrate --model M --adapters A --prompts URI --sample 256 --out stats.json

`--prompts` is a Parquet file, directory or s3:// prefix (a seeded sample of `--sample` rows is
used), or `reference` for the shipped reference set (BIG-bench prompts of tasks in neither shipped pool). Statistics are per (block, module) pair of
`--probe-layers` x `--probe-module` (default: every block, q_proj and v_proj, as the default
routing); use the probe options of the job that will read them (`--calibration stats.json`).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or s3:// prefix")
    parser.add_argument("--adapters", required=True, help="adapter pool directory or s3:// prefix")
    parser.add_argument("--prompts", required=True, help="Parquet file/directory/s3:// prefix, or 'reference'")
    parser.add_argument("--prompt-column", default="prompt", help="column holding the prompts")
    parser.add_argument("--sample", type=int, default=256, help="prompts sampled from --prompts")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", required=True, help="statistics file to write (JSON)")
    parser.add_argument("--signal", default="norm", choices=("norm", "entropy"), help="routing score (routing.signal)")
    parser.add_argument("--probe-layers", "--probe-layer", dest="probe_layers", nargs="+", default=["all"],
                        help="probed blocks: 'all' or block indices, negative from the end (routing.probe_layers)")
    parser.add_argument("--probe-module", nargs="+", default=["q_proj", "v_proj"],
                        help="one or more module names; scores are summed over (block, module) pairs "
                             "(routing.probe_module)")
    parser.add_argument("--probe-input", default="residual", choices=("residual", "module_input"),
                        help="what the probe reads (routing.probe_input)")
    parser.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device of the probe")


def main(args: argparse.Namespace) -> int:
    from pipeline.calibration import calibrate, sample_prompts
    from pipeline.config import InputConfig, StorageConfig

    if args.sample < 1:
        raise SystemExit("--sample must be >= 1")
    storage_cfg = StorageConfig(endpoint=args.endpoint)
    if args.prompts == "reference":
        prompts, source, seed = "reference", "reference", None
    else:
        prompts = sample_prompts(InputConfig(uri=args.prompts, prompt_column=args.prompt_column), storage_cfg,
                                 args.sample, args.seed)
        source, seed = f"sample of {args.prompts}", args.seed
    module = args.probe_module[0] if len(args.probe_module) == 1 else tuple(args.probe_module)
    if args.probe_layers == ["all"]:
        layers: str | int | tuple[int, ...] = "all"
    else:
        try:
            blocks = tuple(int(b) for b in args.probe_layers)
        except ValueError:
            raise SystemExit(f"--probe-layers {' '.join(args.probe_layers)}: give 'all' or block indices") from None
        layers = blocks[0] if len(blocks) == 1 else blocks
    stats = calibrate(args.model, args.adapters, prompts, storage_cfg, source, seed, signal=args.signal,
                      probe_layers=layers, probe_module=module, probe_input=args.probe_input,
                      device=args.device)
    stats.save(args.out)
    print(json.dumps({"out": args.out, "prompts": stats.count, "adapters": len(stats.adapters),
                      "source": stats.source, "seed": stats.seed}))
    return 0
