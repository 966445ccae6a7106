"""PiSSA and OLoRA initialisation as pure functions, plus PiSSA→LoRA conversion.

Both put the principal part of W into the adapter and leave the residual in the base:
W = W_res + s·B0 A0, so the adapted model starts exactly at the base model's output.
  PiSSA: W = U S V^T;  A0 = sqrt(S_r/s) V_r^T,  B0 = U_r sqrt(S_r/s)   (Meng et al. 2024)
  OLoRA: W = Q R;      A0 = R_r,  B0 = Q_r                              (Büyükakyüz 2024)
After training, ΔW = s·(BA - B0A0) = s·[B | -B0][A ; A0]: a plain LoRA of rank 2r on the original W.
"""

from __future__ import annotations

import torch


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """(A0, B0, W_res) for a (d_out, d_in) weight. `niter` uses torch.svd_lowrank (fast, approximate)."""
    w = weight.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.T
    root = torch.sqrt(s / scaling)
    lora_A = root[:, None] * vh
    lora_B = u * root[None, :]
    return lora_A, lora_B, w - scaling * lora_B @ lora_A


def olora_factors(weight: torch.Tensor, r: int, scaling: float):
    """(A0, B0, W_res) from the thin QR decomposition of W."""
    w = weight.float()
    q, rr = torch.linalg.qr(w)
    lora_A, lora_B = rr[:r].contiguous(), q[:, :r].contiguous()
    return lora_A, lora_B, w - scaling * lora_B @ lora_A


def parse_init(init: bool | str) -> tuple[str, int | None]:
    """'pissa' -> ('pissa', None); 'pissa_niter_4' -> ('pissa', 4); 'olora' -> ('olora', None)."""
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        return "pissa", int(init.rsplit("_", 1)[1])
    return str(init), None


def to_plain_lora(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate trained and initial factors: A' = [A ; A0], B' = [B | -B0] (rank doubles)."""
    out = {}
    for key, tensor in trained.items():
        if ".lora_A." in key:
            out[key] = torch.cat([tensor, initial[key].to(tensor.dtype)], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([tensor, -initial[key].to(tensor.dtype)], dim=1)
        else:
            out[key] = tensor
    return out
