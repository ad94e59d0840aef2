"""Text tables, JSON and PNG plots of `Inspection` results. Files are written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

from .. import files
from .measure import FIRST_TOKEN_NOTE, MAX_ACTIVATION_NOTE, UNIFORM_NOTE, Inspection


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_layer_table(result: Inspection) -> str:
    header = f"{'layer':>5} {'F-Attn':>7} {'M-Act':>9} {'@pos':>5} {'gate':>6} {'<0.1':>6} {'<0.01':>6} {'|Y|':>8} {'|Y*g|':>8}"
    lines = [
        f"== {result.label}: {result.model_type}, {result.num_tokens} tokens in {result.num_windows} windows of "
        f"<= {result.window} (attention implementation {result.attn_implementation!r}, read in eager); "
        f"F-Attn excludes query 0; uniform-attention F-Attn {result.uniform_first_token_share:.4f}",
        header,
    ]
    for l in result.layers:
        below = l.gate_fraction_below or {}
        lines.append(
            f"{l.layer:>5} {l.first_token_share:>7.3f} {l.max_abs_activation:>9.2f} {l.max_abs_position:>5} "
            f"{_fmt(l.gate_mean, '6.3f'):>6} {_fmt(below.get('0.1'), '6.3f'):>6} {_fmt(below.get('0.01'), '6.3f'):>6} "
            f"{l.mean_abs_attn_output:>8.4f} {_fmt(l.mean_abs_gated_output, '8.4f'):>8}"
        )
    return "\n".join(lines)


def format_summary_table(results: Sequence[Inspection], extra: Optional[dict[str, dict]] = None) -> str:
    """One row per model, in the form of the paper's Table 4 (F-Attn, M-Act, gate score), plus `extra` columns
    (e.g. losses) given as ``{label: {column: value}}``."""
    extra = extra or {}
    columns = list(dict.fromkeys(c for row in extra.values() for c in row))
    width = max(12, *(len(r.label) for r in results))
    header = f"{'model':<{width}} {'F-Attn mean':>11} {'F-Attn max (layer)':>18} {'M-Act max (layer)':>18} {'gate mean':>9} {'gate<0.1':>8}"
    header += "".join(f" {c:>12}" for c in columns)
    lines = [header]
    for r in results:
        share_max, share_layer = r.first_token_share_max
        act_max, act_layer = r.max_activation
        row = (
            f"{r.label:<{width}} {r.first_token_share_mean:>11.3f} {f'{share_max:.3f} ({share_layer})':>18} "
            f"{f'{act_max:.1f} ({act_layer})':>18} {_fmt(r.gate_mean, '9.3f'):>9} "
            f"{_fmt(r.gate_fraction_below(0.1), '8.3f'):>8}"
        )
        row += "".join(f" {_fmt(extra.get(r.label, {}).get(c), '12.4f'):>12}" for c in columns)
        lines.append(row)
    uniform = sorted({round(r.uniform_first_token_share, 4) for r in results})
    lines += [
        f"note: {FIRST_TOKEN_NOTE}",
        f"note: {MAX_ACTIVATION_NOTE}",
        f"note: {UNIFORM_NOTE}: {', '.join(f'{u:.4f}' for u in uniform)}",
    ]
    return "\n".join(lines)


def environment() -> dict:
    """What a result depends on besides its settings: the CPU, its cores, torch threads and the versions of Python
    (whose `pydoc_data` is the default text), torch and transformers. Stored beside results so tables can name them."""
    import os
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def plot_inspections(results: Sequence[Inspection], path, title: Optional[str] = None) -> Path:
    """Per-layer curves of every result on shared axes: F-Attn, M-Act (log scale), mean gate score and mean
    |attention output| before (solid) / after (dashed) the gate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_share, ax_act), (ax_gate, ax_out) = axes
    for i, r in enumerate(results):
        color = f"C{i}"
        x = [l.layer for l in r.layers]
        ax_share.plot(x, [l.first_token_share for l in r.layers], "o-", color=color, label=r.label, ms=3)
        ax_act.plot(x, [l.max_abs_activation for l in r.layers], "o-", color=color, label=r.label, ms=3)
        gated = r.gated_layers
        if gated:
            ax_gate.plot([l.layer for l in gated], [l.gate_mean for l in gated], "o-", color=color, label=r.label, ms=3)
            ax_gate.plot(
                [l.layer for l in gated], [l.gate_fraction_below["0.1"] for l in gated], ":", color=color,
                label=f"{r.label}: fraction < 0.1",
            )
        ax_out.plot(x, [l.mean_abs_attn_output for l in r.layers], "-", color=color, label=f"{r.label}: |Y|")
        if gated:
            ax_out.plot(
                [l.layer for l in gated], [l.mean_abs_gated_output for l in gated], "--", color=color,
                label=f"{r.label}: |Y*gate|",
            )
    ax_share.set(title="F-Attn: attention on token 0 (queries 1..T-1)", xlabel="layer", ylabel="share", ylim=(0, 1.02))
    ax_act.set(title="M-Act: max |hidden state| per layer", xlabel="layer", ylabel="max |h|", yscale="log")
    ax_gate.set(title="mean gate score (solid), fraction < 0.1 (dotted)", xlabel="layer", ylabel="gate")
    ax_out.set(title="mean |attention output| before / after gate", xlabel="layer", ylabel="mean |value|")
    if not any(r.gated_layers for r in results):
        ax_gate.text(0.5, 0.5, "no gated layers", ha="center", va="center", transform=ax_gate.transAxes)
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title or " vs ".join(r.label for r in results))
    fig.tight_layout()

    try:
        image = io.BytesIO()
        fig.savefig(image, dpi=110, format="png")
        return files.atomic_write(path, image.getvalue())
    finally:
        plt.close(fig)
