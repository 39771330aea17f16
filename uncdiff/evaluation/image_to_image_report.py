"""The report of `evaluate_image_to_image` (docs/algorithms.md §7, §8): report.md, calibration.csv, intervals.csv, guidance.csv,
study.json and panels.png of what `uncdiff.evaluation.image_to_image`'s studies returned. Formats;
computes nothing itself."""

import json
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from uncdiff.evaluation.image_to_image import (calibration_markdown, calibration_rows, draw_panels, guidance_csv_rows,
                                               guidance_markdown, paired_difference)
from uncdiff.evaluation.intervals import interval_csv_rows, interval_markdown
from uncdiff.evaluation.report import write_csv
from uncdiff.io.files import write_atomic


def machine() -> str:
    cpu = " ".join(part for part in (platform.machine(), platform.processor()) if part)
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s)"


def report_markdown(study: dict, record: dict, seconds: float, device: str, guided: Optional[dict] = None,
                    intervals: Optional[dict] = None) -> str:
    """report.md: what ran, the tables, the paired differences, the guaranteed intervals (`intervals`:
    `interval_study`'s), guidance (`guided`: `guidance_study`'s) and the panels."""
    sampler = record["sampler"]
    lines = ["# Image-to-image: uncertainty against the real error", "",
             f"Checkpoint `{record['checkpoint']}` (task `{record['task']}`), {record['held_out']} held-out "
             f"validation images with the pairs of the run's validation, {sampler['steps']} {sampler['name']} "
             f"steps, the output and K = {record['samples']} more samples per input (the baseline's spread), "
             f"M = {record['M']}, seed groups "
             f"{record['seed_groups']}. {seconds / 60:.1f} minutes on {device} ({machine()}).", "",
             f"Command: `{' '.join(record['command'])}`", "",
             "AUSE / AURG rank the output's squared error over the generated pixels by each map "
             "(docs/algorithms.md §6, §7); the K samples have other seeds than the output"
             + (" (BayesDiff's: its own mean trajectory from the same noise, DDIM without x0 clipping, "
                f"Laplace posterior from {laplace_text(record['laplace'])})" if record.get("laplace") else "")
             + ".", "",
             calibration_markdown(study), "", "## Paired differences (per seed group, same outputs)", "",
             "| map | AUSE minus K-sample variance's | AUSE minus random's | beats the baseline by > 2 std | "
             "beats random by > 2 std |", "|---|---|---|---|---|"]
    fmt = lambda pair: f"{pair[0]:+.4f}" + ("" if pair[1] is None else f" ± {pair[1]:.4f}")
    if study["groups"] < 2:
        beats = lambda pair: "n/a (one group)"
    else:
        beats = lambda pair: "yes" if pair[0] + 2 * pair[1] < 0 else "no"
    for name in [*record["estimators"], "K-sample variance"]:
        vs_k = paired_difference(study, name, "K-sample variance")
        vs_random = paired_difference(study, name, "random")
        k_cells = ("—", "—") if name == "K-sample variance" else (fmt(vs_k), beats(vs_k))
        lines.append(f"| {name} | {k_cells[0]} | {fmt(vs_random)} | {k_cells[1]} | {beats(vs_random)} |")
    lines += ["", "With few seed groups the standard deviations are rough; lower AUSE is better.", ""]
    if intervals is not None:
        lines += ["## Guaranteed intervals (docs/algorithms.md §8)", "",
                  "Every heuristic turned into intervals `[f - lam l, f + lam u]` around its output with the same "
                  "risk-controlling guarantee, on the first seed group's restorations (the K-sample spreads use the "
                  "first K of its independent samples; an estimator's spread is the square root of its map). What "
                  "a heuristic pays for the guarantee is the interval length: narrower is better.", "",
                  interval_markdown(intervals), ""]
    if guided is not None:
        lines += ["## Guidance (guided versus unguided, same seeds and inputs)", "",
                  "The unguided output is the study's output; the guided one starts from the same noise "
                  "(docs/algorithms.md §4). A verdict needs the paired difference beyond 2 standard deviations.", "",
                  guidance_markdown(guided), ""]
    if "examples" in study:
        lines += ["## Panels", "", "Condition, output, ground truth, squared error, then each map (summed over "
                  "channels, each on its own scale, zero at the known pixels); first seed group.", "",
                  "![panels](panels.png)", ""]
    return "\n".join(lines)


def laplace_text(laplace: dict) -> str:
    if laplace["source"] == "checkpoint":
        return f"the checkpoint ({laplace['num_images']} images)"
    return f"the first {laplace['num_images']} training pairs"


def write_study_report(out: Path, study: dict, record: dict, seconds: float, device: str,
                       guided: Optional[dict] = None, intervals: Optional[dict] = None) -> list[str]:
    """Write the report's files into `out` (which exists); returns their names, report.md last."""
    written = ["calibration.csv", "study.json"]
    if intervals is not None:
        write_csv(out / "intervals.csv", interval_csv_rows(intervals))
        written.append("intervals.csv")
    if guided is not None:
        write_csv(out / "guidance.csv", guidance_csv_rows(guided))
        written.append("guidance.csv")
    if "examples" in study:
        draw_panels(study["examples"], out / "panels.png")
        written.append("panels.png")
    write_csv(out / "calibration.csv", calibration_rows(study))
    summary = {key: value for key, value in study.items() if key != "examples"}
    write_atomic(out / "study.json", json.dumps({**record, "seconds": round(seconds, 1), "study": summary,
                                                 "guidance_study": guided, "interval_study": intervals},
                                                indent=2).encode())
    write_atomic(out / "report.md", report_markdown(study, record, seconds, device, guided, intervals).encode())
    return [*written, "report.md"]
