"""Tables of a comparison: the per-(method, setting, labelled count, organ) summary, Markdown Dice / HD95 and cost
tables, and the CSV + Markdown files `medclipsam compare` writes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medclipsam.atomic import atomic_write
from medclipsam.errors import InputError, OutputExistsError
from medclipsam.eval.metrics import mean_and_sd, write_table
from medclipsam.experiments.comparison import FILES, ComparisonResult


def summary_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One row per (method, setting, labelled count, organ) and a "mean" organ (the mean over organs per case):
    Dice and HD95 mean ± sd over cases, trainable parameters, training seconds and mean seconds per volume."""
    keys = list(dict.fromkeys((r["method"], r["setting"], r["labelled"]) for r in rows))
    summary = []
    for method, setting, labelled in keys:
        group = [r for r in rows if (r["method"], r["setting"], r["labelled"]) == (method, setting, labelled)]
        concepts = list(dict.fromkeys(r["concept"] for r in group))
        cases = list(dict.fromkeys(r["case_id"] for r in group))
        per_concept = {c: [r for r in group if r["concept"] == c] for c in concepts}
        per_concept["mean"] = [{metric: float(np.mean([r[metric] for r in group if r["case_id"] == case]))
                                for metric in ("dice", "hd95")} for case in cases]
        for concept, members in per_concept.items():
            dice, dice_sd = mean_and_sd([m["dice"] for m in members])
            hd95, hd95_sd = mean_and_sd([m["hd95"] for m in members])
            summary.append({"method": method, "setting": setting, "labelled": labelled, "concept": concept,
                            "dice_mean": dice, "dice_sd": dice_sd, "hd95_mean": hd95, "hd95_sd": hd95_sd,
                            "cases": len(members), "trainable_parameters": group[0]["trainable_parameters"],
                            "train_seconds": group[0]["train_seconds"],
                            "seconds_per_volume": float(np.mean([r["seconds_per_volume"] for r in group]))})
    return summary


def _parameters(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e5 else str(count)


def markdown_tables(summary: Sequence[Mapping[str, Any]], skipped: Mapping[str, str] | None = None) -> str:
    """Markdown: per labelled count, a Dice table and an HD95 table (rows: method and setting; columns: organs,
    their mean, trainable parameters, seconds per volume); then the methods not run and why."""
    lines: list[str] = []
    for labelled in sorted({r["labelled"] for r in summary}):
        rows = [r for r in summary if r["labelled"] == labelled]
        concepts = [c for c in dict.fromkeys(r["concept"] for r in rows) if c != "mean"] + ["mean"]
        entries = list(dict.fromkeys((r["method"], r["setting"]) for r in rows))
        cell = {(r["method"], r["setting"], r["concept"]): r for r in rows}
        for metric, title, digits in (("dice", "Dice", 3), ("hd95", "HD95 (mm)", 1)):
            lines += [f"### {title}, {labelled} labelled volume{'s' if labelled != 1 else ''} "
                      "(mean ± sd over held-out cases)", "",
                      "| method | setting | " + " | ".join(concepts) + " | trainable params | s / volume |",
                      "|---|---|" + "---|" * (len(concepts) + 2)]
            for method, setting in entries:
                first = cell[(method, setting, concepts[-1])]
                values = [cell.get((method, setting, c)) for c in concepts]
                text = [f"{v[metric + '_mean']:.{digits}f} ± {v[metric + '_sd']:.{digits}f}" if v else ""
                        for v in values]
                lines.append(f"| {method} | {setting} | " + " | ".join(text) +
                             f" | {_parameters(first['trainable_parameters'])} | {first['seconds_per_volume']:.2f} |")
            lines.append("")
    if skipped:
        lines += ["### Not run", ""] + [f"- **{name}**: {reason}" for name, reason in skipped.items()] + [""]
    return "\n".join(lines)


def cost_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per method and labelled count, trainable parameters, training seconds and seconds per volume (per
    setting, as inference differs between them)."""
    rows = [r for r in summary if r["concept"] == "mean"]
    lines = ["| method | labelled | setting | trainable params | training (s) | s / volume |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['labelled']} | {r['setting']} | {_parameters(r['trainable_parameters'])} | "
              f"{r['train_seconds']:.1f} | {r['seconds_per_volume']:.2f} |"
              for r in sorted(rows, key=lambda r: (r["method"], r["labelled"], r["setting"]))]
    return "\n".join(lines)


def check_output_folder(folder: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """The result files' paths in `folder`; OutputExistsError when some exist and `overwrite` is off (checked
    before a comparison starts, not after hours of training)."""
    folder = Path(folder)
    paths = {key: folder / name for key, name in FILES.items()}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(folder, f"comparison results are already there ({', '.join(existing)}); pass "
                                        "overwrite=True (--overwrite) or choose another folder")
    return paths


def write_comparison(result: ComparisonResult, folder: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write the summary (`comparison.csv`), the per-case rows (`comparison_cases.csv`) and the Markdown tables
    (`comparison.md`) into `folder`, each atomically; refuses to replace them unless `overwrite`."""
    folder = Path(folder)
    paths = check_output_folder(folder, overwrite)
    if not result.rows:
        raise InputError(folder, "no method was evaluated, so there is no table to write",
                         "Check the methods not run: " + "; ".join(result.skipped.values()) if result.skipped
                         else "Choose at least one method")
    summary = summary_rows(result.rows)
    folder.mkdir(parents=True, exist_ok=True)
    write_table(summary, paths["summary"], fmt="csv", overwrite=True)
    write_table(result.rows, paths["cases"], fmt="csv", overwrite=True)
    text = markdown_tables(summary, result.skipped)
    atomic_write(paths["markdown"], lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return paths


def curve_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Rows for `medclipsam.experiments.plots.dice_vs_labelled_figure`: one line per method and setting."""
    return [{**row, "method": f"{row['method']} ({row['setting']})"} for row in rows]
