"""Run reports: training curves as a PNG and a short markdown summary."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_curves", "write_model_card", "write_run_report", "write_summary"]


def _as_float(value: Any) -> float | None:
    """A plottable float, or None for a missing or non-numeric value."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        x, y = _as_float(r.get("step")), _as_float(r.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def plot_curves(
    records: Sequence[Mapping[str, Any]],
    png_path: str | Path,
    *,
    keys: Sequence[str] = ("reward",),
    title: str = "",
    extra_points: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> Path:
    """Plot each metric in ``keys`` against ``step``, one subplot per metric, to a PNG.

    ``records`` are ``metrics.jsonl`` rows. Keys with no value in any record are skipped,
    and so are None values. ``extra_points`` maps a name to ``(step, value)`` points (e.g.
    evaluation accuracy), drawn with markers on the subplot of that name, which is added
    when ``keys`` lacks it. Uses a bare Agg figure, so pyplot's global state and a user's
    interactive backend are left alone. Parent directories are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    extra = dict(extra_points or {})
    panels: list[tuple[str, tuple[list[float], list[float]], list[tuple[float, float]]]] = []
    for key in dict.fromkeys([*keys, *extra]):  # ordered, without duplicates
        line = _series(records, key)
        points = [(float(x), float(y)) for x, y in extra.get(key, ()) if y is not None]
        if line[0] or points:
            panels.append((key, line, points))

    fig = Figure(figsize=(7.0, 0.6 + 2.4 * max(1, len(panels))), layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    if not panels:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (key, (xs, ys), points) in zip(axes, panels, strict=True):
            if xs:
                ax.plot(xs, ys, linewidth=1.2, label="train")
            if points:
                px, py = zip(*sorted(points), strict=True)
                ax.plot(px, py, marker="o", linewidth=1.2, label="eval" if xs else None)
            if xs and points:
                ax.legend(loc="best", fontsize="small")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")

    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _cell(value: Any) -> str:
    """Table cell text: floats to 4 significant digits, pipes and newlines escaped."""
    if isinstance(value, bool) or value is None:
        text = "" if value is None else str(value)
    elif isinstance(value, numbers.Integral):
        text = str(int(value))
    elif isinstance(value, numbers.Real):
        v = float(value)
        text = f"{v:.4g}" if math.isfinite(v) else str(v)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines.extend("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)
    return "\n".join(lines)


def write_summary(
    path: str | Path,
    title: str,
    sections: Mapping[str, str | Mapping[str, Any] | Sequence[Mapping[str, Any]]],
) -> Path:
    """Write a markdown report: ``# title``, then ``## name`` and a body per section.

    A section body is text as is; a mapping becomes a two-column ``key | value`` table; a
    list of mappings becomes a table whose columns are their keys in first-seen order
    (missing cells left empty). Floats get 4 significant digits. Parent directories are
    created.
    """
    parts = [f"# {title}"]
    for name, body in sections.items():
        parts.append(f"## {name}")
        if isinstance(body, str):
            parts.append(body.strip())
        elif isinstance(body, Mapping):
            parts.append(_table(["key", "value"], list(body.items())))
        elif not body:
            parts.append("_(none)_")
        else:
            columns = list(dict.fromkeys(k for row in body for k in row))
            parts.append(_table(columns, [[row.get(c) for c in columns] for row in body]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


CURVE_KEYS = ("reward", "loss", "entropy", "completions/mean_length", "kl")


def write_run_report(
    run_dir: str | Path, records: Sequence[Mapping[str, Any]], facts: Mapping[str, Any]
) -> tuple[Path, Path]:
    """`summary.md` and `curves.png` of a training run from its metrics.jsonl records:
    the run's facts (recipe, model, steps, last checkpoint), the last step's main metrics,
    the last held-out results, and the curves of reward, loss, entropy, length (and KL),
    with held-out pass@1 as points."""
    run_dir = Path(run_dir)
    evals = [r for r in records if any(str(k).startswith("eval/") for k in r)]
    points = {
        "eval/pass@1": [
            (float(r["step"]), float(r["eval/pass@1"]))
            for r in evals
            if _as_float(r.get("eval/pass@1")) is not None
        ]
    }
    png = plot_curves(
        records,
        run_dir / "curves.png",
        keys=CURVE_KEYS,
        title=str(facts.get("recipe", "")),
        extra_points=points if points["eval/pass@1"] else None,
    )
    last = records[-1] if records else {}
    main = {k: last[k] for k in ("step", *CURVE_KEYS, "grad_norm", "time/step") if k in last}
    held_out = {k: v for k, v in (evals[-1] if evals else {}).items() if str(k).startswith("eval/")}
    md = write_summary(
        run_dir / "summary.md",
        f"grouprl run: {run_dir.name}",
        {
            "Run": dict(facts),
            "Last step": main,
            "Held-out (last evaluation)": held_out or "no evaluation (train.eval_every: 0)",
            "Files": "metrics.jsonl (every step), completions.jsonl (completions tables), "
            "curves.png, config.yaml, checkpoints/",
        },
    )
    return md, png


def write_model_card(
    out_dir: str | Path, config: Mapping[str, Any], metrics: Mapping[str, Any], source: str
) -> Path:
    """README.md of an exported model: how it was trained (recipe, base model, data,
    rewards, the main settings) and the last step's and held-out results."""
    cfg = dict(config)
    model, data = cfg.get("model", {}), cfg.get("data", {})
    rewards = [
        r.get("name") or r.get("path") or r.get("factory") if isinstance(r, Mapping) else r
        for r in cfg.get("rewards", [])
    ]
    train, rollout = cfg.get("train", {}), cfg.get("rollout", {})
    facts = {
        "trained from": model.get("name_or_path"),
        "recipe": cfg.get("recipe") or "(the config's own components)",
        "LoRA": model.get("lora") or "no (full fine-tuning)",
        "data": data.get("path") or data.get("task"),
        "rewards": ", ".join(map(str, rewards)),
        "steps": metrics.get("step"),
        "prompts x samples per step": f"{train.get('prompts_per_step')} x {rollout.get('num_generations')}",
        "learning rate": train.get("learning_rate"),
        "exported from": source,
    }
    results = {k: v for k, v in metrics.items() if k == "reward" or str(k).startswith("eval/")}
    return write_summary(
        Path(out_dir) / "README.md",
        f"{Path(out_dir).name}: trained with grouprl",
        {
            "Training": facts,
            "Results (last step)": results or "no metrics found beside the checkpoint",
            "Use": "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{Path(out_dir).name}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{Path(out_dir).name}")\n```',
        },
    )
