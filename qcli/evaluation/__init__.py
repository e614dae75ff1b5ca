"""qcli eval: what a quantized checkpoint costs on real text, next to its dense reference.

Both models score the same windows of the same text (qcli.evaluation.windows). The reference
runs first and its log-probabilities are kept on disk (qcli.evaluation.cache); the quantized
model runs after it, with the reference out of memory: peak memory is one model. The numbers
(qcli.evaluation.stats) are those of llama.cpp's `perplexity --kl-divergence`.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qcli import checks
from qcli.errors import InputError
from qcli.evaluation import windows as windowing
from qcli.evaluation.engines import TransformersModel, compute_dtype, cpu
from qcli.evaluation.report import EvalReport
from qcli.evaluation.scoring import reference_pass, reference_pass_apart, score
from qcli.evaluation.thresholds import thresholds_for
from qcli.numerics import reference as references

DEFAULT_CTX = 512
CORPUS = "alice.txt"  # chapters I-II of Alice's Adventures in Wonderland (data/SOURCES.md)

ProgressFn = Callable[[str, int, int], None]  # (pass, windows done, windows in all)


@dataclass(frozen=True)
class EvalOptions:
    ctx: int = DEFAULT_CTX
    max_tokens: int | None = None
    engine: str = "transformers"
    # bounds that replace the scheme's (qcli.evaluation.thresholds): max_kld_mean, ...
    overrides: dict[str, float] | None = None
    vllm_python: str | None = None  # --engine vllm: the interpreter that has vLLM


def default_corpus() -> tuple[str, str]:
    """(text, where it comes from) of the corpus qcli ships."""
    data = importlib.resources.files("qcli.evaluation") / "data" / CORPUS
    return data.read_text(encoding="utf-8"), f"qcli's corpus ({CORPUS}: Alice in Wonderland I-II)"


def read_texts(paths: Sequence[str | Path]) -> tuple[str, str]:
    parts = []
    for p in paths:
        try:
            parts.append(Path(p).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--text {p}: cannot read it as UTF-8 text ({e})") from None
    return "\n\n".join(parts), ", ".join(str(p) for p in paths)


def evaluate(
    out: Path,
    *,
    reference: str | None = None,
    use_provenance: bool = True,
    texts: Sequence[str | Path] = (),
    options: EvalOptions | None = None,
    token: str | None = None,
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Score the quantized checkpoint `out` and its dense reference on the same text."""
    opts = options or EvalOptions()
    out = Path(out)
    scheme = _scheme_of(out, opts.engine)
    ref, note = references.resolve(out, reference, use_provenance, token)
    if ref is None:
        raise InputError(f"qcli eval needs the dense reference: pass --reference SRC ({note})")
    text, origin = read_texts(texts) if texts else default_corpus()
    tok = _tokenizer(out, ref.folder)
    wins = windowing.build(
        windowing.tokenize(tok, text), tok.bos_token_id, opts.ctx, opts.max_tokens
    )
    dtype = compute_dtype()
    engine, extra = _engine(opts)
    settings = {"engine": opts.engine, "dtype": str(dtype), **extra}
    if opts.engine == "transformers":  # the reference model in a process of its own
        base, cached = reference_pass_apart(ref.folder, wins, settings, dtype, progress)
    else:  # vLLM runs every model in a worker process already
        load = lambda: engine(ref.folder, dtype)  # noqa: E731
        base, cached = reference_pass(load, ref.folder, wins, settings, progress)
    model = engine(out, dtype)
    try:
        q_info = model.describe()
        comparison = score(model, wins, base, progress)
    except ValueError as e:  # another vocabulary: not this model's reference
        raise InputError(f"{out}: {e}") from None
    finally:
        model.close()
    th = thresholds_for(scheme).override(**(opts.overrides or {}))
    return EvalReport(
        checkpoint=out,
        reference=ref.folder,
        reference_origin=ref.origin,
        scheme=scheme,
        text=origin,
        windows=wins,
        comparison=comparison,
        thresholds=th,
        engines={"reference": base.meta.get("engine"), "quantized": q_info},
        cache={"path": str(base.folder), "reused": cached, "bytes": base.nbytes},
        cpu=cpu(),
    )


def _scheme_of(out: Path, engine: str) -> str:
    """The preset the checkpoint is (for its thresholds); refuses what the engine cannot run."""
    ck, found = checks.check_folder(out)
    if ck is None or not checks.is_quantized(ck):
        raise InputError(
            f"{out} is not a quantized checkpoint (to see what quantizing one would cost, run"
            " `qcli eval SRC --sensitivity --scheme S`)"
        )
    limit = next((f for f in found.findings if f.check == "tensors.expert"), None)
    if engine == "transformers" and limit is not None:
        raise InputError(limit.consequence)
    schemes = sorted({m.scheme.name for m in found.modules})
    if not schemes:
        raise InputError(f"{out}: no quantized layer qcli can read ({found.findings[:1]})")
    return schemes[0] if len(schemes) == 1 else "+".join(schemes)


def _tokenizer(out: Path, fallback: Path):
    from transformers import AutoTokenizer

    for folder in (out, fallback):
        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception:  # noqa: BLE001 (no tokenizer files there: try the next folder)
            continue
    raise InputError(f"{out}: no tokenizer (neither it nor {fallback} has tokenizer files)")


def _engine(opts: EvalOptions):
    """(a function that loads a checkpoint in the engine, what its results depend on)"""
    if opts.engine == "transformers":
        return TransformersModel, {}
    if opts.engine == "vllm":
        from qcli.evaluation.vllm_engine import TOPK, vllm_model

        return vllm_model(opts.vllm_python, opts.ctx), {"topk": TOPK}
    raise InputError(f"--engine: transformers or vllm, not {opts.engine!r}")


__all__ = ["EvalOptions", "EvalReport", "evaluate"]
