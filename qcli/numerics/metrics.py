"""How close a layer's output is to the dense layer's: one set of metrics, streamed.

Every metric is a sum or a maximum over output channels, so a layer checked in blocks of
output rows (and several activation batches) gives exactly the numbers of the whole output
at once. :func:`compare` is the same computation on two whole tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Metrics:
    """The agreement of an output ``y`` with a reference ``ref``, computed in float64.

    * ``sqnr_db = 10 log10(sum ref^2 / sum (y - ref)^2)``: signal to quantization noise;
      +inf when equal, -inf when ``ref`` is all zero and ``y`` is not. Each 6 dB is about one
      bit; int8 W8A8 layers typically give 30-45 dB.
    * ``cosine = <y, ref> / (|y| |ref|)`` over all elements: direction agreement, blind to a
      common scale error; 1.0 when both are zero, 0.0 when one is.
    * ``max_rel_err = max |y - ref| / max |ref|``: the worst element's error as a fraction of
      the output's range (0 if equal, inf if ``ref`` is all zero and ``y`` is not).
    * ``max_abs_err = max |y - ref|``.
    * ``channel_err``: the worst output channel's ``||y - ref|| / ||ref||`` (over tokens),
      and ``worst_channel`` its index (the first bad one when there is NaN).

    NaN anywhere in ``y`` makes every metric NaN.
    """

    sqnr_db: float
    cosine: float
    max_rel_err: float
    max_abs_err: float
    channel_err: float
    worst_channel: int


class Stats:
    """Sums and maxima over blocks of output channels that give :class:`Metrics`."""

    def __init__(self, channels: int):
        self.sig = self.noise = self.dot = self.ynorm = 0.0
        self.max_abs = self.top = 0.0
        self.nan = False
        self.row_sig = torch.zeros(channels, dtype=torch.float64)
        self.row_noise = torch.zeros(channels, dtype=torch.float64)

    def add(self, y: torch.Tensor, ref: torch.Tensor, c0: int) -> None:
        """Outputs ``[tokens, n]`` of channels ``c0 .. c0 + n``."""
        yd, rd = y.double(), ref.double()
        d = yd - rd
        rs, ns = rd.square().sum(0), d.square().sum(0)
        if not bool(torch.isfinite(ns).all()):  # a NaN or inf anywhere reaches its row's sum
            self.nan = True
            ns = torch.nan_to_num(ns, nan=math.inf)
        self.row_sig[c0 : c0 + y.shape[1]] += rs
        self.row_noise[c0 : c0 + y.shape[1]] += ns
        self.sig += float(rs.sum())
        self.noise += float(ns.sum())
        self.dot += float((yd * rd).sum())
        self.ynorm += float(yd.square().sum())
        if d.numel():
            self.max_abs = max(self.max_abs, float(d.abs().max()))
            self.top = max(self.top, float(rd.abs().max()))

    def metrics(self) -> Metrics:
        if self.nan:
            nan = math.nan
            return Metrics(nan, nan, nan, nan, nan, _first_bad(self.row_noise))
        if self.noise == 0:
            sqnr = math.inf
        elif self.sig == 0:
            sqnr = -math.inf
        else:
            sqnr = 10 * math.log10(self.sig / self.noise)
        ny, nr = math.sqrt(self.ynorm), math.sqrt(self.sig)
        if ny == 0 and nr == 0:
            cosine = 1.0
        elif ny == 0 or nr == 0:
            cosine = 0.0
        else:
            cosine = self.dot / (ny * nr)
        if self.max_abs == 0:
            rel = 0.0
        else:
            rel = self.max_abs / self.top if self.top else math.inf
        # a channel whose reference output is all zero is right only when its output is too
        ratio = torch.where(
            self.row_sig > 0,
            self.row_noise / self.row_sig.clamp(min=1e-300),
            torch.where(self.row_noise > 0, math.inf, 0.0),
        ).sqrt()
        worst = int(ratio.argmax()) if ratio.numel() else 0
        ch_err = float(ratio[worst]) if ratio.numel() else 0.0
        return Metrics(sqnr, cosine, rel, self.max_abs, ch_err, worst)


def _first_bad(noise: torch.Tensor) -> int:
    bad = (~torch.isfinite(noise)).nonzero()
    return int(bad[0, 0]) if bad.numel() else 0


def compare(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """:class:`Metrics` of two whole tensors of one shape (the channel terms aside), as a
    dict: ``sqnr_db``, ``cosine``, ``max_rel_err``, ``max_abs_err``."""
    if y.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(y.shape)} vs {tuple(ref.shape)}")
    stats = Stats(1)
    stats.add(y.reshape(-1, 1), ref.reshape(-1, 1), 0)
    m = stats.metrics()
    return {
        "sqnr_db": m.sqnr_db,
        "cosine": m.cosine,
        "max_rel_err": m.max_rel_err,
        "max_abs_err": m.max_abs_err,
    }
