"""What a run's checkpoint directory holds, read from the file system alone (no orbax, no JAX).

orbax writes a step into a temporary directory and gives it its plain numeric name only once
every process has written its part, so a directory named by digits is a complete checkpoint.
The checkpoint manager (vdm/run/checkpoint.py) and the multi-process supervisor
(vdm/run/supervisor.py, which must not start JAX) both describe the last one this way.
"""

from pathlib import Path


def _path(directory):
    # epath.Path (the manager's, which also reaches cloud storage) or a local path string.
    return directory if hasattr(directory, "iterdir") else Path(directory)


def finalised_steps(directory) -> list[int]:
    """Steps of the complete checkpoints in `directory`, ascending ([] if it is missing)."""
    try:
        return sorted(int(p.name) for p in _path(directory).iterdir() if p.name.isdigit())
    except OSError:
        return []


def describe_latest(directory) -> str:
    """'Last complete checkpoint: DIR (step N).', or that `directory` holds none."""
    steps = finalised_steps(directory)
    if not steps:
        return f"No complete checkpoint in {directory}."
    return f"Last complete checkpoint: {_path(directory) / str(steps[-1])} (step {steps[-1]})."
