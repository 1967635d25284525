"""The method's stages by name, in order, and the seeds they draw: the one home of both (the pipeline computes
them, a job runs them one by one, the CLI and the client show them)."""

STAGES = ("latents", "boundary", "generator", "adversarial", "finetune", "evaluate")
JOB_STAGES = (*STAGES, "report")  # a job's: the method's, then the report the worker writes from their outputs


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage, derived from the run's seed."""
    return seed * 1009 + STAGES.index(stage) * 7 + 1


def validation_seed(seed: int) -> int:
    """The seed of the validation split (select.py), derived from the run's seed apart from every stage's."""
    return stage_seed(seed, "finetune") + 101
