"""``transferlab report``: every technique of the note measured against its absence, by the pipeline itself.

``python -m transferlab report [--quick] [--config NAME] [overrides...]`` reads ``conf/report/<NAME>.yaml``
(``default``; ``--quick`` reads ``quick``): seeds, a short training budget, and the ablations, each a
technique without and with (``kind: with_without``) or a key swept over values, the first one the
reference (``kind: sweep``). The base experiment is the default composition with the command line's
overrides (a preset: ``experiment=keras_mlp``; your folder: ``data=imagefolder data.path=...``).

Every arm runs with every seed as one Hydra multirun (``hydra/sweeper=job_list``), so one MLflow parent
run holds every job as a child, prepared data is shared by all jobs and the source task is trained once
per seed. A seed changes the initial weights (the new layers', and the source task's), the batch order
and the augmentation; the data split stays the base's (``data.split_seed`` is pinned), so the arms are
compared seed by seed (:mod:`transferlab.stats`). Arms that compose to the same experiment run once.

The sweep folder is named by the composed jobs and the code they run, so running the same report again
reuses every finished run (an interrupted one resumes); the report is written to ``reports/<name>/`` (``report.md`` with its
plots, and ``report.html``, self-contained) and logged to the parent run.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.errors import ConfigError
from transferlab.registry import Registry
from transferlab.stats import HELPS, HURTS, NO_EFFECT, PairedDifference, paired_difference, summarise, verdict

CONF_DIR = Path("conf")
REPORTS = Path("reports")
SWEEPS = Path("outputs") / "sweeps"
REPORT_KEYS = {"name", "extends", "only", "seeds", "budget", "techniques"}
TECHNIQUE_KEYS = {"name", "title", "claim", "kind"}


# --- the ablations ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    label: str
    overrides: tuple[str, ...]


@dataclass
class Technique:
    name: str
    title: str
    claim: str
    arms: list[Arm]  # the first is the reference ("off"); each other arm is compared with it


# An ablation's kind turns its config entry into arms; the entry holds the kind's keys (and the common ones).
ABLATIONS: Registry = Registry("kind", what="ablation kind", ordered=True)


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(o, str) and "=" in o for o in value):
        raise ConfigError(f"{where}: must be a list of overrides (key=value), got {value!r}")
    return tuple(value)


@ABLATIONS.register("with_without", keys=("with", "without"))
def _with_without(entry: dict, where: str) -> list[Arm]:
    """``without`` and ``with`` the technique: the overrides of each arm (``[]``: the base as it is).
    (Not ``on``/``off``: YAML reads those keys as booleans.)"""
    without = _overrides(entry.get("without", []), f"{where}.without")
    with_ = _overrides(entry.get("with", []), f"{where}.with")
    return [Arm("without" + (f": {' '.join(without)}" if without else " (the base)"), without),
            Arm("with" + (f": {' '.join(with_)}" if with_ else " (the base)"), with_)]


@ABLATIONS.register("sweep", keys=("key", "values"))
def _sweep(entry: dict, where: str) -> list[Arm]:
    """``key`` over ``values``, the first the reference (a log-spaced dropout sweep starts at 0)."""
    key, values = entry.get("key"), entry.get("values")
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}.key: the config key to sweep, e.g. regularisation.dropout.hidden")
    if not isinstance(values, list) or len(values) < 2:
        raise ConfigError(f"{where}.values: at least two values (the reference first), got {values!r}")
    return [Arm(f"{key}={_value(v)}", (f"{key}={_value(v)}",)) for v in values]


def _value(v: Any) -> str:
    return "null" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() \
        if isinstance(v, bool) else str(v)


@dataclass
class ReportConfig:
    name: str
    path: Path
    seeds: list[int]
    budget: list[str]
    techniques: list[Technique]


def load_report_config(name: str, conf_dir: Path = CONF_DIR) -> ReportConfig:
    """``conf/report/<name>.yaml``, checked key by key (``extends`` another and keeps ``only`` some of its
    techniques)."""
    import yaml

    path = conf_dir / "report" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir / "report").glob("*.yaml"))
        raise ConfigError(f"--config {name}: no {path}; the report configs are {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - REPORT_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(REPORT_KEYS)}")
    if "extends" in raw:
        parent = load_report_config(raw["extends"], conf_dir)
        techniques = parent.techniques
        if "techniques" in raw:
            techniques = techniques + _techniques(raw["techniques"], path)
        if "only" in raw:
            names = {t.name for t in techniques}
            missing = [n for n in raw["only"] if n not in names]
            if missing:
                raise ConfigError(f"{path}: only: {missing} are no techniques of it; known: {sorted(names)}")
            techniques = [t for t in techniques if t.name in raw["only"]]
        return ReportConfig(raw.get("name", name), path, _seeds(raw.get("seeds", parent.seeds), path),
                            list(_overrides(raw.get("budget", parent.budget), f"{path}: budget")), techniques)
    if "only" in raw:
        raise ConfigError(f"{path}: only: needs extends: (the report config whose techniques it picks)")
    return ReportConfig(raw.get("name", name), path, _seeds(raw.get("seeds"), path),
                        list(_overrides(raw.get("budget", []), f"{path}: budget")),
                        _techniques(raw.get("techniques"), path))


def _seeds(seeds: Any, path: Path) -> list[int]:
    if not isinstance(seeds, list) or len(seeds) < 2 or len(set(seeds)) != len(seeds) or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"{path}: seeds: at least two distinct non-negative integers (an interval needs two "
                          f"paired differences), got {seeds!r}")
    return list(seeds)


def _techniques(entries: Any, path: Path) -> list[Technique]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: techniques: a list of ablations, got {entries!r}")
    out, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{path}: techniques[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{where}: each technique needs a name")
        where = f"{path}: technique '{entry['name']}'"
        if entry["name"] in seen:
            raise ConfigError(f"{where}: the name is used twice")
        seen.add(entry["name"])
        try:
            kind = ABLATIONS[entry.get("kind", "with_without")]
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if any(isinstance(k, bool) for k in entry):
            raise ConfigError(f"{where}: a key reads as {[k for k in entry if isinstance(k, bool)]} (YAML takes "
                              "on/off/yes/no for booleans); the arms are `with` and `without`")
        unknown = set(entry) - TECHNIQUE_KEYS - kind.keys
        if unknown:
            raise ConfigError(f"{where}: kind '{kind.name}' takes no {sorted(unknown)}; its keys are "
                              f"{sorted(TECHNIQUE_KEYS | kind.keys)}")
        out.append(Technique(entry["name"], entry.get("title", entry["name"]), entry.get("claim", ""),
                             kind.build(entry, where)))
    return out


# --- the jobs ------------------------------------------------------------------------------------------------

def merge(*groups: Any) -> list[str]:
    """Overrides in order, a later one replacing an earlier one of the same key (Hydra refuses a key twice)."""
    out: dict[str, str] = {}
    for group in groups:
        for override in group:
            key = override.partition("=")[0].lstrip("+~")
            out.pop(key, None)
            out[key] = override
    return list(out.values())


@dataclass
class Plan:
    """The distinct experiments (``arms``: overrides without the seed) and each technique arm's index."""
    common: list[str]  # the budget, the base's overrides and the pinned split
    experiments: list[list[str]] = field(default_factory=list)
    arm_of: dict[tuple[str, int], int] = field(default_factory=dict)  # (technique, arm number) -> experiment
    same_as: dict[int, str] = field(default_factory=dict)  # experiment -> the first arm that defined it
    key: str = ""  # names the sweep folder: the composed experiments and the seeds


def plan(config: ReportConfig, base: list[str], conf_dir: Path = CONF_DIR) -> tuple[Plan, Any]:
    """Compose and check every arm before any work; arms that compose alike share their runs."""
    from transferlab.compose import compose, config_groups
    from transferlab.config.preflight import preflight
    from transferlab.config.validate import check_override_keys, load_config

    groups = config_groups(conf_dir)
    base = [o for o in base if o.partition("=")[0] != "seed"]  # the report's seeds decide
    check_override_keys([*config.budget, *base], groups)
    base_cfg = load_config(compose(merge(config.budget, base), config_dir=conf_dir))
    common = merge(config.budget, base, [f"data.split_seed={base_cfg.split_seed}"])
    p = Plan(common)
    composed: dict[str, int] = {}
    digest = hashlib.sha256()
    for technique in config.techniques:
        for i, arm in enumerate(technique.arms):
            overrides = merge(common, arm.overrides, [f"seed={config.seeds[0]}"])
            try:
                check_override_keys(arm.overrides, groups)
                params = compose(overrides, config_dir=conf_dir)
                cfg = load_config(params)
                preflight(cfg, tracking=False)
            except ConfigError as err:
                raise ConfigError(f"{config.path}: technique '{technique.name}', arm {arm.label}: {err}") from None
            params.pop("composition", None)
            identity = json.dumps(params, sort_keys=True)
            if identity not in composed:
                composed[identity] = len(p.experiments)
                p.experiments.append(merge(arm.overrides))
                p.same_as[composed[identity]] = f"{technique.name}: {arm.label}"
                digest.update(identity.encode())
            p.arm_of[(technique.name, i)] = composed[identity]
    digest.update(json.dumps([config.seeds, common, p.experiments]).encode())
    digest.update(code_digest().encode())
    p.key = digest.hexdigest()[:12]
    return p, base_cfg


# Modules that only write the report: editing them re-renders it from the same runs.
REPORT_ONLY = ("transferlab/report.py", "transferlab/stats.py", "transferlab/tracking/results.py")


def code_digest() -> str:
    """sha256 of the code the jobs run (the package and its Hydra plugins, less :data:`REPORT_ONLY`): after a
    change of it the report trains again rather than reuse runs of other code."""
    import transferlab

    src = Path(transferlab.__file__).parent.parent
    digest = hashlib.sha256()
    for path in sorted([*(src / "transferlab").rglob("*.py"), *(src / "hydra_plugins").rglob("*.py")]):
        rel = path.relative_to(src).as_posix()
        if rel not in REPORT_ONLY:
            digest.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def jobs_of(p: Plan, seeds: list[int]) -> list[tuple[int, int, list[str]]]:
    """(experiment, seed, the job's overrides: a command line that runs it alone), experiment-major."""
    return [(e, s, merge(p.common, overrides, [f"seed={s}"])) for e, overrides in enumerate(p.experiments)
            for s in seeds]


# --- running ---------------------------------------------------------------------------------------------------

def run_sweep(sweep_dir: Path, jobs: list[list[str]], labels: list[str]) -> int:
    """Run the jobs not finished yet as one multirun in ``sweep_dir`` (the finished ones are skipped by the
    app itself); a line per job as it finishes. Returns the number of jobs run now."""
    from transferlab.tracking.sweep import finished_job

    todo = [i for i, job in enumerate(jobs) if finished_job(sweep_dir / str(i), job) is None]
    if not todo:
        return 0
    sweep_dir.mkdir(parents=True, exist_ok=True)
    jobs_file = sweep_dir / "jobs.json"
    jobs_file.write_text(json.dumps(jobs, indent=1))
    log = sweep_dir / "report.log"
    cmd = [sys.executable, "-m", "transferlab", "-m", "hydra/sweeper=job_list",
           f"hydra.sweeper.jobs_file={jobs_file.resolve()}", f"hydra.sweep.dir={sweep_dir}"]
    print(f"report: {len(todo)} of {len(jobs)} jobs to run (log: {log})", flush=True)
    started = time.perf_counter()
    done = threading.Event()

    def progress() -> None:
        left = set(todo)
        while left and not done.wait(1.0):
            for i in sorted(left):
                result = finished_job(sweep_dir / str(i), jobs[i])
                if result is not None:
                    left.discard(i)
                    print(f"report: job {i + 1}/{len(jobs)} done in {time.perf_counter() - started:.0f} s: "
                          f"{labels[i]}: test_acc={result['test_acc']:.4f} (run {result['run_id']})", flush=True)

    watcher = threading.Thread(target=progress, daemon=True)
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        watcher.start()
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C reached the sweep too; SIGTERM (KeyboardInterrupt here) is passed on
            proc.terminate()
            proc.wait()
            raise
        finally:
            done.set()
            watcher.join()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        print(tail, file=sys.stderr, end="")
        print(f"error: the report's sweep failed (exit {code}); its log: {log}", file=sys.stderr)
        raise SystemExit(code if code == 2 else 1)
    return len(todo)


# --- the numbers ------------------------------------------------------------------------------------------------

@dataclass
class ArmResult:
    label: str
    overrides: list[str]
    experiment: int
    runs: dict[int, Any]  # seed -> RunRecord

    def values(self, metric: str) -> dict[int, float]:
        return {s: r.metrics[metric] for s, r in self.runs.items()}


def _ci(d: PairedDifference, digits: int = 4) -> str:
    return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"


def _ms(values: dict[int, float], digits: int = 4) -> str:
    s = summarise(list(values.values()))
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def run_link(record: Any, ui: str) -> str:
    return f"[{record.run_id[:8]}]({ui}/#/experiments/{record.experiment_id}/runs/{record.run_id})"


def ui_address(uri: str) -> str:
    """Where the MLflow UI shows the runs: the tracking server itself, else ``make ui``'s address."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


# --- rendering -------------------------------------------------------------------------------------------------
# One list of blocks renders as Markdown (plots as PNG files beside it) and as self-contained HTML (plots
# inline as base64): ("h", level, text), ("p", text), ("table", header, rows), ("code", text), ("img", name, png).
# Text may hold `code` and [links](url), as Markdown writes them.

def to_markdown(blocks: list[tuple], plots_dir: Path) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                                  *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]))
        elif kind == "code":
            out.append(f"```bash\n{block[1]}\n```")
        elif kind == "img":
            (plots_dir / block[1]).write_bytes(block[2])
            out.append(f"![{block[1]}]({plots_dir.name}/{block[1]})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
         "th{background:#f3f3f3}code,pre{background:#f6f6f6}pre{padding:.6em;overflow-x:auto}img{max-width:100%}")


def to_html(blocks: list[tuple], title: str) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{_inline(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in block[1]) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>"
                               for row in block[2]) + "</table>")
        elif kind == "code":
            out.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "img":
            data = base64.b64encode(block[2]).decode()
            out.append(f"<img alt='{html.escape(block[1])}' src='data:image/png;base64,{data}'>")
    return "\n".join(out) + "\n</body></html>\n"


def plot(technique: Technique, arms: list[ArmResult], val_metric: str) -> bytes:
    """Bars (mean ± std over seeds) of test accuracy and the validation metric, and each arm's mean
    validation accuracy per epoch."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(arms))
    for offset, metric in ((-0.2, "test_acc"), (0.2, val_metric)):
        stats = [summarise(list(a.values(metric).values())) for a in arms]
        bars.bar(x + offset, [s.mean for s in stats], 0.4, yerr=[s.std for s in stats], capsize=4, label=metric)
    low = min(min(a.values("test_acc").values()) for a in arms)
    bars.set_ylim(max(0.0, low - 0.05), 1.0) if val_metric.endswith("acc") else None
    bars.set_xticks(x, [a.label.split(": ", 1)[-1][:28] for a in arms], rotation=15, ha="right", fontsize=8)
    bars.set_title(f"{technique.title}: mean ± std over seeds", fontsize=9)
    bars.legend(fontsize=8)
    for a in arms:
        histories = [r.curves.get("val_acc", []) for r in a.runs.values()]
        n = min(len(h) for h in histories)
        if n:
            h = np.array([hist[:n] for hist in histories])
            epochs = np.arange(1, n + 1)
            curves.plot(epochs, h.mean(0), marker="o", markersize=3, label=a.label.split(": ", 1)[-1][:28])
            curves.fill_between(epochs, h.mean(0) - h.std(0), h.mean(0) + h.std(0), alpha=0.2)
    curves.set_xlabel("epoch")
    curves.set_ylabel("val_acc")
    curves.set_title("validation accuracy per epoch (mean ± std)", fontsize=9)
    curves.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def command(overrides: list[str]) -> str:
    return "python -m transferlab " + " ".join(shlex.quote(o) for o in overrides)


def build_report(config: ReportConfig, p: Plan, base: list[str], results: list[list[ArmResult]],
                 *, parent: str, sweep_dir: Path, ui: str, val_metric: str, higher_val: bool, split_seed: int,
                 invocation: str) -> list[tuple]:
    blocks: list[tuple] = [("h", 1, f"Ablation report `{config.name}`")]
    blocks.append(("p", f"Base experiment: `{command(base) if base else 'python -m transferlab'}` (the default "
                        f"composition with these overrides), with the report's budget `{' '.join(config.budget)}`. "
                        f"Each arm ran with seeds {', '.join(map(str, config.seeds))}. A seed changes the initial "
                        f"weights (the new layers', and the source task's when the backbone is pretrained on it), the "
                        f"batch order and the augmentation, but not the data split: every job has "
                        f"`data.split_seed={split_seed}`, so all arms train, select and test on the same images and "
                        f"are compared seed by seed."))
    blocks.append(("p", f"MLflow parent run `{parent}` holds every job as a child run ({ui}, `make ui`); the sweep "
                        f"folder is `{sweep_dir}`. Generated by `{invocation}`."))
    blocks.append(("p", f"Each difference is with − without (for a sweep: the value − the first value), by seed, with a 95% "
                        f"confidence interval by Student's t over the {len(config.seeds)} paired differences. The "
                        f"verdict reads the interval of the test accuracy: \"{HELPS}\" or \"{HURTS}\" when it excludes "
                        f"0, else \"{NO_EFFECT}\". Fit time is `train_seconds` (fine-tuning only), mean over seeds."))
    summary_rows, sections = [], []
    for technique, arms in zip(config.techniques, results):
        ref = arms[0]
        lines, diff_rows = [], []
        if len({a.experiment for a in arms}) == 1:
            lines.append("not measured: its arms compose to the same experiment on this base")
        for arm in arms[1:]:
            if arm.experiment == ref.experiment:
                lines.append(f"{arm.label}: the same experiment as the reference on this base")
                continue
            d = paired_difference(arm.values("test_acc"), ref.values("test_acc"))
            dv = paired_difference(arm.values(val_metric), ref.values(val_metric))
            word = verdict(d)
            lines.append(f"{arm.label}: **{word}** (test accuracy {_ci(d)})")
            diff_rows.append([arm.label, _ci(d), _ci(dv), verdict(dv, higher_is_better=higher_val)])
            summary_rows.append([technique.title, arm.label, f"**{word}**", _ci(d)])
        sections.append(("h", 2, technique.title))
        if technique.claim:
            sections.append(("p", f"The note: {technique.claim}"))
        sections.append(("p", "Verdict: " + "; ".join(lines) + "."))
        rows = []
        for a in arms:
            links = " ".join(run_link(a.runs[s], ui) for s in config.seeds)
            seconds = summarise([r.metrics.get("train_seconds", float("nan")) for r in a.runs.values()]).mean
            rows.append([a.label, _ms(a.values("test_acc")), _ms(a.values(val_metric)), f"{seconds:.1f}", links])
        sections.append(("table", ["arm", "test acc (mean ± std)", f"{val_metric} (mean ± std)", "fit s", "runs"],
                         rows))
        if diff_rows:
            sections.append(("table", ["against the reference", "Δ test acc [95% CI]", f"Δ {val_metric} [95% CI]",
                                       f"by {val_metric}"], diff_rows))
        per_seed = [[a.label, s, f"{a.runs[s].metrics['test_acc']:.4f}", f"{a.runs[s].metrics[val_metric]:.4f}",
                     f"{a.runs[s].metrics.get('train_seconds', float('nan')):.1f}", run_link(a.runs[s], ui)]
                    for a in arms for s in config.seeds]
        sections.append(("table", ["arm", "seed", "test acc", val_metric, "fit s", "MLflow run"], per_seed))
        sections.append(("img", f"{technique.name}.png", plot(technique, arms, val_metric)))
        sections.append(("p", f"Reproduce each arm (seed {config.seeds[0]}; `seed=` picks the others):"))
        sections.append(("code", "\n".join(command(merge(p.common, a.overrides, [f"seed={config.seeds[0]}"]))
                                           for a in arms)))
    blocks.append(("h", 2, "Summary"))
    blocks.append(("table", ["technique", "arm (against the reference)", "verdict", "Δ test acc [95% CI]"],
                   summary_rows))
    return blocks + sections


# --- the command -----------------------------------------------------------------------------------------------

def report(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="transferlab report", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick subset (conf/report/quick.yaml)")
    parser.add_argument("--config", default=None, help="conf/report/<CONFIG>.yaml (default: default)")
    parser.add_argument("overrides", nargs="*", help="the base experiment: Hydra overrides or a preset")
    args = parser.parse_args(argv)
    if args.quick and args.config:
        parser.error("--quick is --config quick; give one of them")
    started = time.perf_counter()
    config = load_report_config("quick" if args.quick else args.config or "default")
    p, base_cfg = plan(config, list(args.overrides))
    from transferlab.tracking.preflight import check_tracking
    from transferlab.tracking.results import log_report, read_runs
    from transferlab.tracking.store import tracking_uri
    from transferlab.tracking.sweep import finished_job, parent_run_id

    check_tracking(base_cfg)
    sweep_dir = SWEEPS / f"report-{config.name}-{p.key}"
    jobs = jobs_of(p, config.seeds)
    overrides = [job for _, _, job in jobs]
    labels = [f"{p.same_as[e]}, seed {s}" for e, s, _ in jobs]
    print(f"report: {len(config.techniques)} techniques, {len(p.experiments)} distinct arms x "
          f"{len(config.seeds)} seeds = {len(jobs)} jobs in {sweep_dir}", flush=True)
    ran = run_sweep(sweep_dir, overrides, labels)
    parent = parent_run_id(sweep_dir)
    run_of = {(e, s): finished_job(sweep_dir / str(i), overrides[i])["run_id"]  # type: ignore[index]
              for i, (e, s, _) in enumerate(jobs)}
    uri = tracking_uri(base_cfg.tracking.uri)
    records = read_runs(uri, run_of.values())
    results = [[ArmResult(arm.label, list(arm.overrides), p.arm_of[(t.name, i)],
                          {s: records[run_of[(p.arm_of[(t.name, i)], s)]] for s in config.seeds})
                for i, arm in enumerate(t.arms)] for t in config.techniques]
    val_metric = base_cfg.optimized_metric
    from transferlab.tracking.sweep import HIGHER_IS_BETTER

    invocation = "transferlab report " + " ".join(shlex.quote(a) for a in argv)
    blocks = build_report(config, p, list(args.overrides), results, parent=parent or "?", sweep_dir=sweep_dir,
                          ui=ui_address(uri), val_metric=val_metric, higher_val=HIGHER_IS_BETTER[val_metric],
                          split_seed=base_cfg.split_seed, invocation=invocation.strip())
    out = REPORTS / config.name
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(to_markdown(blocks, plots))
    (out / "report.html").write_text(to_html(blocks, f"transferlab report {config.name}"))
    if parent:
        log_report(uri, parent, [out / "report.md", out / "report.html"],
                   {"report": config.name, "report_jobs": str(len(jobs))})
    print(f"report: {out / 'report.md'} and {out / 'report.html'} ({ran} jobs run now, "
          f"{len(jobs) - ran} reused; {time.perf_counter() - started:.0f} s); MLflow parent run {parent}")
    return out


def main(argv: list[str] | None = None) -> None:
    from transferlab.cli import guarded

    try:
        guarded(lambda: report(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the sweep ended its runs KILLED
        print("report: interrupted; the same command goes on where it stopped (finished jobs are kept)",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
