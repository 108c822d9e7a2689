"""The typed configurations of the jobs, and what every job loads from them.

:class:`DataConfig` holds what the prune job, the train job and the sweep share (model, data,
task, sizes, seed, progress); each job's dataclass extends it with its own fields, so
:func:`load_for_job` and :func:`training_args` read typed attributes, never a duck-typed bag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class DataConfig:
    model: str = "default"
    data: str = "bbc-news"
    task: str | None = None  # None: inferred from the data and the model
    max_train: int | None = None
    max_eval: int | None = None
    max_length: int = 128
    batch_size: int = 16
    eval_batch_size: int = 64
    doc_stride: int | None = None  # question answering: window overlap (None: max_length // 3)
    eval_split: str | None = None  # hub data: the split to evaluate on
    eval_data: str | None = None  # a separate validation file
    eval_stride: int | None = None  # causal LM: the evaluation window's stride
    seed: int = 0
    progress: bool = True
    threads: int | None = None
    #: under torch.distributed, a rank other than 0 that runs in a scratch folder of its own and
    #: reads its outputs back (the sweep) writes them there; not a setting
    private_outputs: bool = dataclasses.field(default=False, repr=False, compare=False)

    def check(self) -> None:
        """Refuse sizes no run can use, naming the option (before anything is loaded)."""
        from curvature.cli.outputs import JobError

        for name in ("max_length", "batch_size", "eval_batch_size"):
            _at_least(name, getattr(self, name), 1, JobError)
        for name in ("max_train", "max_eval", "threads", "doc_stride", "eval_stride"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 0 if name == "doc_stride" else 1, JobError)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise JobError(f"--seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_args(cls, args, **values):
        """The configuration from parsed command-line options (``--no-progress`` included): every
        field whose option the subcommand has, then ``values``."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in vars(args).items() if k in names}
        if hasattr(args, "no_progress"):
            given["progress"] = not args.no_progress
        return cls(**{**given, **values})


def _at_least(name: str, value, low: int, error) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise error(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")


def at_least(name: str, value, low: float, *, error=None, what: str = "") -> None:
    """Refuse a number below ``low`` (or not a number), naming the option ``--name`` (and
    ``what`` it is)."""
    import math

    from curvature.cli.outputs import JobError

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low:
        raise (error or JobError)(
            f"--{name.replace('_', '-')}{f' ({what})' if what else ''} must be a number >= "
            f"{low:g}, got {value!r}"
        )


def load_for_job(job: DataConfig):
    """Seed, then load the job's task: model, tokenizer, training features, collator, evaluator
    (a :class:`curvature.tasks.kinds.Prepared`)."""
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from curvature.cli.utils import quiet_progress
    from curvature.tasks.kinds import prepare

    if job.threads:
        torch.set_num_threads(job.threads)
    hf_logging.set_verbosity_error()
    if not job.progress:
        quiet_progress()
    set_seed(job.seed)
    return prepare(
        job.task,
        job.model,
        job.data,
        seed=job.seed,
        max_train=job.max_train,
        max_eval=job.max_eval,
        max_length=job.max_length,
        eval_batch_size=job.eval_batch_size,
        doc_stride=job.doc_stride,
        eval_split=job.eval_split,
        eval_data=job.eval_data,
        stride=job.eval_stride,
    )


def training_args(job: DataConfig, output_dir, *, checkpoint_every: int | None = None, **kwargs):
    """``TrainingArguments`` shared by the jobs: no reporting, the job's seed, batch size and
    progress switch, the CPU when there is no CUDA device; a checkpoint every
    ``checkpoint_every`` steps when given (0: only the resumable state, no periodic saves)."""
    from transformers import TrainingArguments

    saving = {"save_strategy": "no"}
    if checkpoint_every is not None:
        saving = {
            "save_strategy": "steps",
            "save_steps": checkpoint_every or 10**9,
            "save_total_limit": 1,
        }
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=job.batch_size,
        **saving,
        report_to=[],
        seed=job.seed,
        disable_tqdm=not job.progress,
        use_cpu=not torch.cuda.is_available(),
        **kwargs,
    )
