"""The table of eval records that `python -m vdm.collect` prints: one markdown row per record
of workdir/eval/*.json (vdm/run/eval_records.py), with the published numbers a config's
docstring states (its first paragraph, e.g. "2.65 bits/dim") above it.
"""

import importlib.util
import json
import re
from pathlib import Path

_COLUMNS = (
    "workdir", "step", "estimator", "dequantization", "likelihood", "bits/dim", "examples",
    "draws", "NFE mean/max", "split", "EMA",
)  # fmt: skip
_NUMBER = re.compile(r"(\d+\.\d+)\s*(?:bits/dim|\))")


def published(config_path: str) -> tuple[str, list[str]]:
    """(the first paragraph of a config file's docstring, the bits/dim figures it states)."""
    path = Path(config_path.split(":")[0])
    if not path.is_file():
        raise FileNotFoundError(f"--config={config_path!r}: no such file.")
    spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first = (module.__doc__ or "").strip().split("\n\n")[0]
    text = " ".join(first.split())
    return text, _NUMBER.findall(text)


def read_records(workdirs) -> list[tuple[str, dict]]:
    """(workdir, record) for every eval record, in workdir order then step order."""
    out = []
    for workdir in workdirs:
        folder = Path(workdir) / "eval"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: run --mode=eval on {workdir} first.")
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        records.sort(key=lambda r: (r["step"], r["estimator"] != "elbo", r["estimator"]))
        out += [(str(workdir), r) for r in records]
    return out


def _row(workdir: str, r: dict) -> list[str]:
    steps = "-"
    if "num_steps_mean" in r:
        steps = f"{r['num_steps_mean']:.1f}/{r['num_steps_max']:.0f}"
    return [
        workdir,
        str(r["step"]),
        r["estimator"],
        r["dequantization"],
        r["likelihood"].split(":")[0],
        f"{r['bpd']:.4f} ± {r['bpd_stderr']:.4f}",
        str(r["num_examples"]),
        str(r["num_draws"]),
        steps,
        f"{r['dataset']['name']}/{r.get('split_name', r['split'])}",
        "yes" if r["use_ema"] else "no",
    ]


def table(records, config_path: str | None = None) -> str:
    """The markdown text: published numbers (with a config), the table, the accountings."""
    lines = []
    if config_path:
        text, numbers = published(config_path)
        figures = ", ".join(numbers) if numbers else "none stated"
        lines += [f"Published ({config_path}): {figures} bits/dim. {text}", ""]
    lines.append("| " + " | ".join(_COLUMNS) + " |")
    lines.append("|" + "---|" * len(_COLUMNS))
    lines += ["| " + " | ".join(_row(w, r)) + " |" for w, r in records]
    accountings = sorted({f"{r['estimator']}/{r['dequantization']}: {r['accounting']}"
                          for _, r in records})  # fmt: skip
    if accountings:
        lines += ["", "Accounting:"] + [f"- {a}" for a in accountings]
    return "\n".join(lines) + "\n"
