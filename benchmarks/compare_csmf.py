"""Does a change of CSMF's configuration change its quality beyond seed noise?

Compares the CSMF rows of two experiment reports run with the same protocol (data, towers, seeds,
early stopping, popularity prior, each tuned on validation) that differ in their base configuration,
e.g. the committed synthetic report (tf-keras Adam) and a report run with ``--optimizer lazy_adam
--sparse-embeddings`` and its own learning-rate grid::

    python -m pipelines.experiments --dataset synthetic --mode full --methods csmf --optimizer lazy_adam \\
        --sparse-embeddings --learning-rates 0.003,0.01 --temperatures 0.05,0.1 --no-sweeps \\
        --out docs/results/training/lazy_adam_synthetic
    python benchmarks/compare_csmf.py --reference docs/results/synthetic \\
        --candidate docs/results/training/lazy_adam_synthetic --out docs/results/training/optimizer_quality.json

Per objective it prints test Recall@50 / NDCG@50 mean ± std over seeds and calls a difference
"within seed noise" when ``|mean_b - mean_a| <= 2 * sqrt(std_a^2 / n_a + std_b^2 / n_b)`` (two standard
errors of the difference of the means). Writes ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

METRICS = ("recall@50", "ndcg@50")


def csmf_summary(folder: Path) -> tuple[dict, dict]:
    result = json.loads((folder / "results.json").read_text())
    method = result["methods"]["csmf"]
    return result, method


def config_differences(reference: dict, candidate: dict) -> dict:
    """``{field: [reference value, candidate value]}`` of the two base configurations (defaults filled in)."""
    from csmf_tf.training.stages import TrainingConfig

    a, b = (TrainingConfig.from_json(c).to_json() for c in (reference, candidate))
    return {k: [a[k], b[k]] for k in sorted(a) if a[k] != b[k]}


def compare(reference: Path, candidate: Path) -> dict:
    ref_result, ref = csmf_summary(reference)
    cand_result, cand = csmf_summary(candidate)
    if ref_result["dataset"] != cand_result["dataset"]:
        raise SystemExit(f"the reports are on different datasets: {ref_result['dataset']} and {cand_result['dataset']}")
    rows = []
    for objective in ref_result["objectives"]:
        for metric in METRICS:
            a = ref["summary"]["stage"][f"{objective}/{metric}"]
            b = cand["summary"]["stage"][f"{objective}/{metric}"]
            noise = 2 * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
            diff = b["mean"] - a["mean"]
            rows.append({"objective": objective, "metric": metric, "reference": a, "candidate": b,
                         "difference": round(diff, 6), "two_standard_errors": round(noise, 6),
                         "within_seed_noise": abs(diff) <= noise})
    arm = lambda result, method, folder: {  # noqa: E731 - a small record builder
        "folder": str(folder), "command": result["command"], "chosen": method["chosen"],
        "seconds_per_run": method["summary"]["seconds"]}
    return {"dataset": ref_result["dataset"],
            "differences": config_differences(ref_result["base_config"], cand_result["base_config"]),
            "reference": arm(ref_result, ref, reference), "candidate": arm(cand_result, cand, candidate),
            "rows": rows, "all_within_seed_noise": all(r["within_seed_noise"] for r in rows)}


def format_table(report: dict) -> str:
    ref, cand = report["reference"], report["candidate"]
    changed = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in report["differences"].items()) or "nothing"
    lines = [f"{report['dataset']}: CSMF with {changed}", "",
             f"| objective | metric | reference ({ref['chosen']}) | candidate ({cand['chosen']}) | difference | "
             "2 x standard error | within seed noise |", "|---|---|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        a, b = r["reference"], r["candidate"]
        lines.append(f"| {r['objective']} | {r['metric']} | {a['mean']:.4f} ± {a['std']:.4f} | "
                     f"{b['mean']:.4f} ± {b['std']:.4f} | {r['difference']:+.4f} | {r['two_standard_errors']:.4f} | "
                     f"{'yes' if r['within_seed_noise'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="a report folder (results.json)")
    p.add_argument("--candidate", type=Path, required=True, help="a report folder run with another configuration")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    report = compare(args.reference, args.candidate)
    print(format_table(report))
    print(f"every metric within seed noise: {report['all_within_seed_noise']}")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
