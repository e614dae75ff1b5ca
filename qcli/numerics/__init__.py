"""Numeric verification: every quantized layer's GEMM, as its scheme runs, against dense.

- numerics.layers: one layer, streamed in row blocks, kernel checked against exact math;
- numerics.reference: the dense checkpoint to compare with (default: the recorded source);
- numerics.metrics: SQNR, cosine, errors, streamed; numerics.thresholds: what passes;
- numerics.activations: the seeded inputs; numerics.report: the result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qcli import checks, dequant, gemm, provenance
from qcli.errors import InputError
from qcli.numerics import reference as references
from qcli.numerics.layers import LayerResult, VerifyOptions, run_layers, select
from qcli.numerics.report import Report

__all__ = ["LayerResult", "Report", "VerifyOptions", "verify_checkpoint"]


def verify_checkpoint(
    out: Path,
    *,
    reference: str | None = None,
    use_provenance: bool = True,
    layers: str | None = None,
    options: VerifyOptions | None = None,
    token: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Report:
    """Contract checks, then every selected quantized layer (end to end on real text is
    `qcli eval`, qcli.evaluation).

    Raises InputError for input that cannot be verified at all (exit code 2); everything
    wrong with the checkpoint itself is in the Report.
    """
    out = Path(out)
    opts = options or VerifyOptions()
    ck, found = checks.check_folder(out)
    if ck is not None and not checks.is_quantized(ck):
        raise InputError(f"{out} is not quantized (no quantization_config, no quantized tensors)")
    if ck is not None and dequant.is_release(ck):
        raise InputError(
            f"{out} is a block-fp8 release (quant_method 'fp8'), not a compressed-tensors"
            " checkpoint: verify checks what qcli writes; `qcli quantize` re-quantizes it"
        )
    ref, note = references.resolve(out, reference, use_provenance, token)
    report = Report(out, found, ref, note, opts, layers)
    report.cpu = {**gemm.cpu_features(), "int8_may_saturate": gemm.int8_gemm_may_saturate()}
    if ck is None:
        return report  # the files themselves are broken: findings say how
    modules = select(found.modules, layers, strict=found.ok)
    if ref is not None:
        try:
            references.match(ref, modules, found)
        except InputError as e:
            if ref.origin != provenance.NAME:
                raise
            report.reference = ref = None
            report.reference_note = (
                f"the source in {provenance.NAME} does not match ({e}): {references.NO_REFERENCE}"
            )
    if ref is not None:
        skip = {qm.name for qm in found.modules}
        found.findings.extend(
            references.compare_dense_tensors(ck, ref, lambda n: n.rpartition(".")[0] in skip)
        )
    for i, result in enumerate(run_layers(modules, ref, opts)):
        report.layers.append(result)
        if progress:
            progress(i + 1, len(modules), result.module)
    return report
