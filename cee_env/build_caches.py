"""Build a task's layer caches ahead of a sweep, on one process or on several with ``accelerate launch``.

    python -m cee_env.build_caches --task MCID --splits calib dev
    accelerate launch --num_processes 4 -m cee_env.build_caches --task MNLI --splits calib dev   # 4 GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m cee_env.build_caches --task MCID

Under ``accelerate launch`` every process encodes its share of the batches (the batches of
the one-process pass, dealt out in turn) and the main process merges them into the cache one
process would write: same folder, fingerprint, row order and checksums (byte-identical when
the processes run the same kernels, e.g. all on CPU). The main process holds the cache's lock
while the others help; every process must see ``runs/`` (one machine, or shared storage). A
missing stage-1 checkpoint is trained first, under the same launch (DDP). Later commands
(``agents.benchmark``, ``agents.compare``, ...) find the caches and load them.
"""
from __future__ import annotations

from dataclasses import dataclass

from backbones.cli import parse, user_errors


@dataclass
class Args:
    task: str = "RTE"
    """task whose caches to build (a catalogued task, or the name in --task-file)"""
    splits: tuple[str, ...] = ("calib", "dev")
    """splits to cache: train, calib, calib-a, calib-b, dev, test (test needs --test-file)"""
    task_file: str | None = None
    """a task described by a TOML/JSON file (then --task is ignored)"""
    model: str | None = None
    """backbone whose deployed stage-1 checkpoint is cached (default: the packaged all-MiniLM-L6-v2; see backbones.train --model)"""
    checkpoint: str | None = None
    """stage-1 checkpoint directory (default: the protocol's deployed one for --model, trained if missing)"""
    protocol: str | None = None
    """how calib rows are obtained: holdout or crossfit (default: the task's, backbones.protocol)"""
    data_dir: str | None = None
    """data directory (default $CEE_DATA_DIR or ../shared/data)"""
    test_file: str | None = None
    """a labelled test file of the task's format (the split 'test')"""
    batch_size: int = 64
    """instances per forward pass (each process runs whole batches of the one-process pass)"""
    rebuild: bool = False
    """build even when an intact cache exists"""


def build(args: Args) -> dict:
    """Every asked-for cache of the task, built (or loaded); {split: LayerCache}."""
    from backbones.cli import UserError
    from cee_env.cache import SPLITS, get_cache, launched_processes

    task = args.task
    if args.task_file:
        from backbones.tasks import load_task_file

        task = load_task_file(args.task_file).name
    bad = [s for s in args.splits if s not in SPLITS]
    if bad or not args.splits:
        raise UserError(f"--splits must name some of {', '.join(SPLITS)}; got {' '.join(args.splits) or 'nothing'}")
    if "test" in args.splits and not args.test_file:
        raise UserError("--splits test needs --test-file (a labelled file of the task's format)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1; got {args.batch_size}")
    ps = launched_processes()
    out = {}
    for split in dict.fromkeys(args.splits):
        out[split] = c = get_cache(task, split, checkpoint=args.checkpoint, data_dir=args.data_dir,
                                   test_file=args.test_file, rebuild=args.rebuild, batch_size=args.batch_size,
                                   protocol=args.protocol, model=args.model)
        if ps is None or ps.is_main_process:
            print(f"{task}/{split}: {c.num_instances} instances x {c.num_layers} layers, fingerprint {c.fingerprint[:16]}",
                  flush=True)
    return out


@user_errors
def main(argv: list[str] | None = None) -> dict:
    return build(parse(Args, argv, __doc__))


if __name__ == "__main__":
    main()
