"""``snapstore.slurm.detect``: which Slurm job ``snapstore run`` is in, from the environment."""

from __future__ import annotations

from snapstore.slurm import SlurmJob, detect


def test_outside_slurm() -> None:
    assert detect({}) is None
    assert detect({"SLURM_JOB_ID": ""}) is None
    assert detect({"SLURM_JOB_ID": "12x"}) is None  # not a job id: not trusted


def test_batch_job_and_its_restarts() -> None:
    assert detect({"SLURM_JOB_ID": "42"}) == SlurmJob("42", 0, None)
    job = detect({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "3"})
    assert job == SlurmJob("42", 3, None) and str(job) == "Slurm job 42"
    assert detect({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "x"}) == SlurmJob("42", 0, None)


def test_array_task_is_requeued_by_its_own_job_id() -> None:
    job = detect({"SLURM_JOB_ID": "107", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "7"})
    assert job is not None and job.job_id == "107"
    assert str(job) == "Slurm job 107 (array task 100_7)"
