"""qcli's Python API: what the command line runs, for notebooks and pipelines.

Each function returns the objects the CLI's JSON output is made from (``.to_json()``) and
raises typed errors (qcli.errors: InputError, PlanError, OutputError, ...; each carries the
exit code the CLI uses). Nothing here prints.

    import qcli

    plan = qcli.plan("./Llama-3.2-1B", scheme="W8A8", lm_head=True)   # headers only
    done = qcli.quantize("./Llama-3.2-1B", "./Llama-3.2-1B-W8A8", lm_head=True)
    report = qcli.verify("./Llama-3.2-1B-W8A8")                      # report.ok
    info = qcli.inspect("./Llama-3.2-1B-W8A8")
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcli import outdir, planner, rules, sharding, source
from qcli.errors import InputError, QcliError
from qcli.planner import Plan, PlanOptions
from qcli.schemes import get_scheme

if TYPE_CHECKING:
    from qcli import parts
    from qcli.convert import Result
    from qcli.evaluation.report import EvalReport
    from qcli.evaluation.sensitivity import Sensitivity
    from qcli.numerics import Report
    from qcli.summary import Summary


def plan_options(
    scheme: str = "W8A8",
    *,
    lm_head: bool = False,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    default_ignore: bool = True,
    allow_unmatched: bool = False,
    int8_max: int = 127,
) -> PlanOptions:
    return PlanOptions(
        scheme=get_scheme(scheme),
        targets=tuple(targets or rules.DEFAULT_TARGETS),
        ignore=tuple(ignore or ()),
        lm_head=lm_head,
        default_ignore=default_ignore,
        allow_unmatched=allow_unmatched,
        int8_max=int8_max,
    )


def plan(
    src: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    **options: Any,
) -> Plan:
    """What quantize would do, from headers alone (a hub repo's weights are not downloaded).

    `options`: those of :func:`plan_options` (scheme, lm_head, targets, ignore, ...)."""
    opened = source.open_headers(str(src), revision, token)
    return planner.build(opened.checkpoint, plan_options(**options))


@dataclass
class QuantizeResult:
    """A finished quantize run: the plan it executed and what it wrote."""

    plan: Plan
    written: Result
    source: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        body = self.plan.to_json(detail=False)
        body.update(
            source=self.source,
            out=str(self.written.out),
            files=self.written.files,
            bytes_written=self.written.bytes_out,
            seconds=round(self.written.seconds, 3),
        )
        return body


def quantize(
    src: str | Path,
    out: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    workers: int | None = None,
    progress: Callable[[int, str], None] | None = None,
    on_tensor: Callable[[planner.TensorPlan], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    **options: Any,
) -> QuantizeResult:
    """Quantize checkpoint `src` (a folder or hub repo id) into the folder `out`, atomically.

    `options`: those of :func:`plan_options`. `progress(bytes, tensor)` is called as source
    bytes are done, `on_tensor(tensor_plan)` as each tensor is complete, `on_plan(plan)` once
    the plan is made, before any weight is read."""
    from qcli.convert import convert

    out = _out_path(out)
    shard_bytes = _shard_bytes(max_shard_size)
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be 0 (one per core) or more, not {workers}")
    opts = plan_options(**options)
    src_info = source.resolve(str(src), revision, token)
    made = planner.build(source.open_checkpoint(src_info.folder), opts)
    outdir.check(made.checkpoint.folder, out, overwrite)
    if on_plan:
        on_plan(made)
    record = _record(src_info, opts, max_shard_size)
    written = convert(
        made,
        out,
        overwrite=overwrite,
        max_shard_size=shard_bytes,
        provenance=record,
        progress=progress,
        on_tensor=on_tensor,
        workers=workers,
    )
    return QuantizeResult(made, written, src_info.provenance())


def _record(src: source.Source, opts: planner.PlanOptions, max_shard_size: str | int) -> dict:
    """What qcli_provenance.json and the model card say about the run."""
    return {
        "source": src.provenance(),
        "options": {
            "scheme": opts.scheme.name,
            "targets": list(opts.targets),
            "ignore": list(opts.ignore),
            "lm_head": opts.lm_head,
            "default_ignore": opts.default_ignore,
            "allow_unmatched": opts.allow_unmatched,
            "int8_max": opts.int8_max,
            "max_shard_size": str(max_shard_size),
        },
    }


def quantize_part(
    src: str | Path,
    out: str | Path,
    part: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    max_shard_size: str | int = "5GB",
    workers: int | None = None,
    progress: Callable[[int, str], None] | None = None,
    on_tensor: Callable[[planner.TensorPlan], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    **options: Any,
) -> parts.PartResult:
    """Part `part` ("I/N") of a quantize run: only its own output shards, into `out`
    (qcli.parts). Every part computes the same plan; a hub source downloads only the
    shards this part reads. Run :func:`finish_parts` once all parts are done."""
    from qcli import parts

    split = parts.parse_split(part)
    out = _out_path(out)
    opened, made, jobs = _split_plan(src, revision, token, max_shard_size, options)
    mine = parts.assign(jobs, split.count)[split.index - 1]
    source.fetch_files(opened, {f.name for f in parts.source_files(mine)})
    if on_plan:
        on_plan(made)
    return parts.run_part(
        made, out, jobs, split, workers=workers, progress=progress, on_tensor=on_tensor
    )


def finish_parts(
    src: str | Path,
    out: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    max_shard_size: str | int = "5GB",
    **options: Any,
) -> QuantizeResult:
    """After every part: check the shards, write the rest of the checkpoint (qcli.parts)."""
    from qcli import parts

    out = _out_path(out)
    opened, made, jobs = _split_plan(src, revision, token, max_shard_size, options)
    src_info = source.fetch_files(opened, set())
    record = _record(src_info, made.options, max_shard_size)
    written = parts.finish(made, out, jobs, record)
    return QuantizeResult(made, written, src_info.provenance())


def quantize_on_ray(
    src: str | Path,
    out: str | Path,
    *,
    address: str | None = None,
    cpus: int = 1,
    revision: str | None = None,
    token: str | None = None,
    max_shard_size: str | int = "5GB",
    progress: Callable[[int, str], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    **options: Any,
) -> QuantizeResult:
    """The run as Ray tasks, one per output shard (qcli.cluster), then :func:`finish_parts`:
    the same files as :func:`quantize`. `address`: the cluster (else RAY_ADDRESS, else a
    local one); `cpus`: each task's num_cpus, and its threads."""
    from qcli import cluster, parts

    out = Path(os.path.abspath(_out_path(out)))
    if cpus < 1:
        raise InputError(f"--workers must be 1 or more with --ray, not {cpus}")
    _, made, jobs = _split_plan(src, revision, token, max_shard_size, options)
    if not (out / parts.PARTS_DIR).is_dir():  # else: a run that stopped, resumed
        outdir.check(made.checkpoint.folder, out, False)
    if on_plan:
        on_plan(made)
    local = source.local_folder(str(src), revision)
    spec = str(local.resolve()) if local is not None else str(src)  # the same on every node
    t0 = time.perf_counter()
    cluster.run(
        spec,
        out,
        address=address,
        cpus=cpus,
        max_shard_size=max_shard_size,
        revision=revision,
        token=token,
        options=options,
        shards=len(jobs),
        progress=progress,
    )
    done = finish_parts(
        spec, out, revision=revision, token=token, max_shard_size=max_shard_size, **options
    )
    done.written.seconds = time.perf_counter() - t0  # the whole run, not the finish alone
    return done


def _split_plan(
    src: str | Path,
    revision: str | None,
    token: str | None,
    max_shard_size: str | int,
    options: dict[str, Any],
) -> tuple[source.Opened, Plan, list]:
    """What every part of a split run computes alike, from headers: the source, the plan and
    its output shards."""
    from qcli.convert import shard_jobs

    shard_bytes = _shard_bytes(max_shard_size)
    opts = plan_options(**options)  # bad options are said before the source is read
    opened = source.open_headers(str(src), revision, token)
    made = planner.build(opened.checkpoint, opts)
    return opened, made, shard_jobs(made, shard_bytes)


def _out_path(out: str | Path) -> Path:
    if not str(out).strip():
        # an unset $OUT in a script: "" would otherwise mean the working folder
        raise InputError("OUT is empty (an unset variable?); give the output folder")
    return Path(out)


def _shard_bytes(max_shard_size: str | int) -> int:
    if isinstance(max_shard_size, int):
        if max_shard_size <= 0:
            raise InputError("--max-shard-size: the size must be positive")
        return max_shard_size
    return sharding.parse_size(max_shard_size, "--max-shard-size")


@dataclass
class DryRun:
    """What `quantize --dry-run` shows: the plan, the files, and why the run would stop."""

    plan: Plan
    source: dict[str, Any]
    label: str
    out: Path
    files: list[str]
    problems: list[str]

    def to_json(self) -> dict[str, Any]:
        body = self.plan.to_json()
        body.update(
            source=self.source,
            out=str(self.out),
            files=self.files,
            dry_run=True,
            output_problems=self.problems,
        )
        return body


def dry_run(
    src: str | Path,
    out: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    **options: Any,
) -> DryRun:
    """The plan quantize would execute, from headers (no weights read or downloaded)."""
    out = _out_path(out)
    shard_bytes = _shard_bytes(max_shard_size)
    opened = source.open_headers(str(src), revision, token)
    made = planner.build(opened.checkpoint, plan_options(**options))
    files = [name for name, _ in sharding.shard_layout(made, shard_bytes)]
    problems = []
    try:
        outdir.check(made.checkpoint.folder, out, overwrite)
    except QcliError as e:  # the real run would stop here: say so, but the preview stands
        problems.append(f"quantize would stop: {e}")
    return DryRun(made, opened.source, opened.label, out, files, problems)


@dataclass
class Inspection:
    """What `qcli inspect` shows: the checkpoint, and the plan a quantize run would make."""

    summary: Summary
    plan: Plan | None
    plan_error: str | None
    explicit: bool  # options were given (a plan that cannot be made is then an error)

    def to_json(self) -> dict[str, Any]:
        body = self.summary.to_json()
        body["plan"] = self.plan.to_json() if self.plan else None
        body["plan_error"] = self.plan_error
        return body


def inspect(
    src: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    **options: Any,
) -> Inspection:
    """A checkpoint's summary from its headers (dense or quantized), and for a dense one, a
    release quantize re-quantizes (block fp8), or when `options` are given, the plan quantize
    would execute."""
    from qcli import summary

    opts = plan_options(**options)  # a bad option fails before anything is read
    opened = source.open_headers(str(src), revision, token)
    found = summary.summarize(opened)
    explicit = bool(options)
    made, error = None, None
    requantize = found.quantization is not None and found.quantization.requantizable
    if not found.quantized or explicit or requantize:
        try:
            made = planner.build(opened.checkpoint, opts)
        except QcliError as e:
            error = str(e)
    return Inspection(found, made, error, explicit)


def verify(
    path: str | Path,
    *,
    reference: str | None = None,
    use_provenance: bool = True,
    layers: str | None = None,
    fast: bool = False,
    tokens: Sequence[int] = (1, 7, 64),
    seed: int = 0,
    token: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Report:
    """Contract checks and every quantized layer's GEMM against the dense layer.

    `reference`: the dense source (folder or repo id); by default the source recorded in
    qcli_provenance.json when it can still be read. Returns the Report (``.ok``)."""
    from qcli.numerics import VerifyOptions, verify_checkpoint

    opts = VerifyOptions(tokens=tuple(tokens), fast=fast, seed=seed)
    return verify_checkpoint(
        Path(path),
        reference=reference,
        use_provenance=use_provenance,
        layers=layers,
        options=opts,
        token=token,
        progress=progress,
    )


def eval(  # noqa: A001  (the command's name: `qcli eval`)
    path: str | Path,
    *,
    reference: str | None = None,
    use_provenance: bool = True,
    texts: Sequence[str | Path] = (),
    ctx: int = 512,
    max_tokens: int | None = None,
    engine: str = "transformers",
    vllm_python: str | None = None,
    thresholds: dict[str, float | None] | None = None,
    update_card: bool = False,
    token: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvalReport:
    """Perplexity, KL divergence and top-1 agreement of the quantized checkpoint `path`
    against its dense reference on real text (qcli.evaluation). `thresholds` overrides the
    scheme's (max_kld_mean, max_kld_p99, max_ln_ppl_ratio, min_top1); `update_card` adds the
    numbers to the checkpoint's model card. Returns the EvalReport (``.ok``)."""
    from qcli.evaluation import EvalOptions, evaluate

    overrides = {k: v for k, v in (thresholds or {}).items() if v is not None}
    opts = EvalOptions(ctx, max_tokens, engine, overrides, vllm_python)
    report = evaluate(
        Path(path),
        reference=reference,
        use_provenance=use_provenance,
        texts=texts,
        options=opts,
        token=token,
        progress=progress,
    )
    if update_card:
        from qcli import card

        card.add_eval(Path(path), report)
    return report


def sensitivity(
    src: str | Path,
    *,
    scheme: str = "W8A8",
    texts: Sequence[str | Path] = (),
    ctx: int = 512,
    max_tokens: int | None = None,
    per_layer: bool = False,
    kl_budget: float | None = None,
    ignore: Sequence[str] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> Sensitivity:
    """What quantizing each group of a dense checkpoint's layers with `scheme` costs: lm_head,
    each projection kind (and with `per_layer` each layer), one group at a time, in memory;
    ranked by KL. With `kl_budget`, the --ignore list that keeps within it."""
    from qcli.evaluation import default_corpus, read_texts
    from qcli.evaluation.sensitivity import run

    folder = source.resolve(str(src)).folder
    text, _ = read_texts(texts) if texts else default_corpus()
    return run(
        folder,
        get_scheme(scheme),
        text,
        ctx=ctx,
        max_tokens=max_tokens,
        per_layer=per_layer,
        kl_budget=kl_budget,
        ignore=ignore,
        progress=progress,
    )
