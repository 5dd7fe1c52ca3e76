"""lm-eval-harness on an in-memory model and a local task (the task file is passed in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def lm_eval_task_config(path: str | Path, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The task YAML as a dict, its data file made absolute (datasets resolves against the cwd);
    ``cache_dir``: where ``datasets`` may write its Arrow cache (a private temp dir: no shared-cache races)."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {k: str(Path(path).parent / v) for k, v in files.items()}
    if cache_dir is not None:
        cfg["dataset_kwargs"]["cache_dir"] = str(cache_dir)
    return cfg


def lm_eval_scores(model, tokenizer, task: str | Path, device: str = "cpu", batch_size: int = 8) -> dict[str, float]:
    """lm-eval-harness on an in-memory model (``HFLM``) and the task YAML ``task``: {metric: value}.

    ``evaluator.evaluate`` with a TaskManager that skips the built-in task index: ``simple_evaluate`` adds
    environment reports and indexes every bundled task, several times slower than the scoring itself
    (docs/qlora.md).
    """
    import tempfile

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    with tempfile.TemporaryDirectory() as cache:
        tasks = get_task_dict([lm_eval_task_config(task, cache_dir=cache)],
                              TaskManager(include_defaults=False, verbosity="ERROR"))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        out = evaluate(lm, tasks, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    result = next(iter(out["results"].values()))
    return {k.split(",")[0]: float(v) for k, v in result.items()
            if k.split(",")[0] in ("acc", "acc_norm") and isinstance(v, (int, float))}
