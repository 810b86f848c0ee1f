"""A learned task-oriented bottleneck at the split layer: few channels, quantised, entropy-coded.

At encoder layer `layer`, the hidden states [B, T, D] go through
- an analysis transform (layernorm, linear D -> C): C latent channels per token;
- scalar quantisation: rounding to integers, clamped to [-A, A] (the learned linear sets the scale);
- a learned factorized prior per channel (the non-parametric density of Balle et al. 2018, as in
  compressai's EntropyBottleneck): its probability of each integer gives the rate term in training
  and the probability tables the range coder (constriction) uses on the wire;
- a synthesis transform (linear C -> H, GELU, linear H -> D) back to hidden states at `layer`, from
  which the frozen rest of the encoder and the decoders go on.

Training (aiflow.model.train's bottleneck phase) minimises caption cross-entropy + `rate_weight` x
bits per image, on top of the frozen family: the rate weight is the one knob for the rate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ALPHABET = 15  # symbols are integers in [-ALPHABET, ALPHABET]
PMF_PRECISION = 16  # bits of the integer probability tables the range coder uses


class FactorizedPrior(nn.Module):
    """A learned cumulative density per channel (Balle et al. 2018, 'Variational image compression with
    a scale hyperprior', appendix 6.1; the same model as compressai's EntropyBottleneck)."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        dims = (1, *filters, 1)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def logits_cumulative(self, x: torch.Tensor) -> torch.Tensor:
        """x [C, 1, N] -> logits of the cumulative density at x, [C, 1, N]."""
        for i, matrix in enumerate(self.matrices):
            x = torch.matmul(F.softplus(matrix), x) + self.biases[i]
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """Probability mass of the unit interval around each value of y [..., C] under its channel's density."""
        c = y.shape[-1]
        flat = y.reshape(-1, c).t().unsqueeze(1)  # [C, 1, N]
        lower = self.logits_cumulative(flat - 0.5)
        upper = self.logits_cumulative(flat + 0.5)
        sign = -torch.sign(lower + upper).detach()
        p = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        return p.squeeze(1).t().reshape(y.shape).clamp_min(1e-9)

    def pmf(self) -> torch.Tensor:
        """[C, 2A+1] probability of each symbol -A..A per channel, tails folded into the end symbols."""
        with torch.no_grad():
            c = self.matrices[0].shape[0]
            points = torch.arange(-ALPHABET, ALPHABET + 1, dtype=torch.float32)
            edges = torch.cat([points - 0.5, points[-1:] + 0.5]).expand(c, -1).unsqueeze(1)
            cdf = torch.sigmoid(self.logits_cumulative(edges)).squeeze(1)
            cdf[:, 0], cdf[:, -1] = 0.0, 1.0
            return (cdf[:, 1:] - cdf[:, :-1]).clamp_min(0.0)


def quantized_pmf(pmf: np.ndarray) -> np.ndarray:
    """Integer tables [C, 2A+1] summing to 2**PMF_PRECISION per channel, every symbol at least 1: what
    both ends of a link code with, so encoder and decoder agree bit for bit."""
    total = 1 << PMF_PRECISION
    n = pmf.shape[1]
    p = np.asarray(pmf, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    q = np.floor(p * (total - n)).astype(np.int64) + 1
    short = total - q.sum(axis=1)
    for c in range(len(q)):  # hand the rounding remainder to the most likely symbol
        q[c, int(np.argmax(p[c]))] += short[c]
    return q.astype(np.int32)


class Bottleneck(nn.Module):
    """Analysis, quantiser, prior and synthesis for features taken at one encoder layer."""

    def __init__(self, dims: int, channels: int, layer: int, hidden: int = 192):
        super().__init__()
        self.dims, self.channels, self.layer, self.hidden = dims, channels, layer, hidden
        self.norm = nn.LayerNorm(dims)
        self.analysis = nn.Linear(dims, channels)
        self.synthesis = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, dims))
        self.prior = FactorizedPrior(channels)
        # The integer probability tables both ends of a link code with, fixed when training ends
        # (`freeze_tables`) and saved with the weights: a receiver never recomputes them in floating
        # point, so two machines always agree on them.
        self.register_buffer("tables", torch.zeros(channels, 2 * ALPHABET + 1, dtype=torch.int32))

    def analyse(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, D] -> unquantised latents [B, T, C]."""
        return self.analysis(self.norm(hidden))

    @staticmethod
    def quantise(y: torch.Tensor) -> torch.Tensor:
        """Round and clamp to the symbol range; in training, gradients pass straight through."""
        q = torch.round(y).clamp(-ALPHABET, ALPHABET)
        return y + (q - y).detach() if y.requires_grad else q

    def synthesise(self, symbols: torch.Tensor) -> torch.Tensor:
        """Integer latents [B, T, C] (as floats) -> hidden states [B, T, D] at `layer`."""
        return self.synthesis(symbols)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: (reconstructed hidden [B, T, D], bits per image [B])."""
        y = self.analyse(hidden)
        noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5)  # the rate of the quantised latents, differentiably
        bits = -torch.log2(self.prior.likelihood(noisy)).sum(dim=(1, 2))
        return self.synthesise(self.quantise(y)), bits

    def symbols(self, hidden: torch.Tensor) -> np.ndarray:
        """Hidden states -> int32 symbols [B, T, C] in [-A, A] (what the wire carries)."""
        with torch.inference_mode():
            return self.quantise(self.analyse(hidden.float())).to(torch.int32).numpy()

    def freeze_tables(self) -> None:
        """Fix the coding tables from the learned prior (after training)."""
        self.tables.copy_(torch.from_numpy(quantized_pmf(self.prior.pmf().numpy())))

    def coding_tables(self) -> np.ndarray:
        """[C, 2A+1] int32 counts summing to 2**PMF_PRECISION per channel; ValueError before training."""
        tables = self.tables.numpy()
        if not (tables.sum(axis=1) == 1 << PMF_PRECISION).all():
            raise ValueError(f"bottleneck learned:{self.channels} at layer {self.layer} has no coding tables; train it (freeze_tables)")
        return tables


# ---- the family's bottlenecks: lookup, saving, loading ---------------------------------------------

BOTTLENECK_DIR = "bottleneck"


def file_name(channels: int, layer: int) -> str:
    return f"learned-{channels}-layer{layer}.safetensors"


def trained(family) -> dict[tuple[int, int], Bottleneck]:
    """The family's trained bottlenecks by (channels, layer); empty for a family without."""
    return getattr(family, "bottlenecks", {})


def describe(family) -> str:
    have = sorted(trained(family))
    return ", ".join(f"learned:{c} at layer {l}" for c, l in have) or "none"


def bottleneck_of(family, channels: int, layer: int) -> Bottleneck:
    """The bottleneck of `learned:channels` at split layer `layer`; ValueError naming the trained ones."""
    found = trained(family).get((channels, layer))
    if found is None:
        raise ValueError(
            f"no trained bottleneck for codec learned:{channels} at split layer {layer} (this model has: "
            f"{describe(family)}); use one of those, or train one with `aiflow train --bottleneck {channels}:{layer}`"
        )
    return found


def save_bottlenecks(family, out_dir) -> None:
    from pathlib import Path

    from safetensors.torch import save_file

    if not trained(family):
        return
    root = Path(out_dir) / BOTTLENECK_DIR
    root.mkdir(parents=True, exist_ok=True)
    for (channels, layer), bn in sorted(trained(family).items()):
        state = {k: v.detach().contiguous() for k, v in bn.state_dict().items()}
        meta = {"channels": str(channels), "layer": str(layer), "dims": str(bn.dims), "hidden": str(bn.hidden)}
        save_file(state, root / file_name(channels, layer), metadata=meta)


def load_bottlenecks(root) -> dict[tuple[int, int], Bottleneck]:
    """Every bottleneck saved under `root/bottleneck/`; ValueError naming a file that does not load."""
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    out = {}
    folder = Path(root) / BOTTLENECK_DIR
    for path in sorted(folder.glob("learned-*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            channels, layer, dims, hidden = (int(meta[k]) for k in ("channels", "layer", "dims", "hidden"))
            bn = Bottleneck(dims, channels, layer, hidden)
            bn.load_state_dict(load_file(path))
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise ValueError(f"bottleneck {path} does not load: {exc}") from exc
        out[(channels, layer)] = bn.eval()
    return out
